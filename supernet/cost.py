"""The cost model: the one place where the size (and bit-operations) of a model is defined.

The same function prices a supernet (candidate probabilities from the logits, so the size is
differentiable in alpha) and a discrete Architecture (one-hot probabilities), so expected and exact
size agree by construction. Conventions follow REFERENCE.md "Size accounting":
  * scope ENCODER: the Linear weights of the encoder layers at their bits, plus one step size per
    quantized group (biases and LayerNorm are not "encoder weights");
  * scope TOTAL: every parameter: all sites (weights, steps, biases) and everything else in FP32;
  * a pruned group costs nothing, its bias included; a float candidate costs 16/32 bits and no step;
  * avg_bits is bits per weight WITHOUT step overhead (the papers' "2-bit"); size_bytes includes it;
  * MB means MiB (2**20 bytes), as in Q-BERT's and AQ-BERT's tables.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Sequence

import torch

from .quantizers import CandidateKind, candidate_kind
from .space import SiteKind

FP32_BITS = 32
MIB = 2**20


class Scope(Enum):
    ENCODER = "encoder"
    TOTAL = "total"


@dataclass(frozen=True)
class SiteShape:
    """What the cost of a site depends on, besides its bits."""

    kind: SiteKind
    n_groups: int
    group_numel: int  # weights per group
    rows_per_group: int  # output features (bias entries) per group
    in_features: int  # MACs per output feature per token (0 for embeddings)
    bias: bool


@dataclass(frozen=True)
class CostEntry:
    """One site priced with candidate probabilities probs [G, K] over `bits` and activation bits."""

    shape: SiteShape
    bits: Sequence[int]
    probs: torch.Tensor
    a_bits: torch.Tensor | float = float(FP32_BITS)


@dataclass
class Size:
    """Size of a scope: bytes (with step overhead) and average bits per weight (without)."""

    bytes: torch.Tensor
    avg_bits: torch.Tensor
    weights: int

    @property
    def mb(self) -> torch.Tensor:
        return self.bytes / MIB


def candidate_bits(bits: Sequence[int], shape: SiteShape, scale_bits: int = FP32_BITS, device=None,
                   dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[K] weight bits, step bits and kept-bias bits of ONE group of `shape` at each candidate."""
    kinds = [candidate_kind(b) for b in bits]
    weight = torch.tensor([float(b * shape.group_numel) for b in bits], device=device, dtype=dtype)
    step = torch.tensor([float(scale_bits if k is CandidateKind.INT else 0) for k in kinds], device=device, dtype=dtype)
    bias_bits = FP32_BITS * shape.rows_per_group if shape.bias else 0
    bias = torch.tensor([float(0 if k is CandidateKind.ZERO else bias_bits) for k in kinds], device=device, dtype=dtype)
    return weight, step, bias


def _dot(p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum(p @ w) in p's precision even inside torch.autocast, whose fp16 matmul overflows a size in bits."""
    try:
        off = torch.autocast(p.device.type, enabled=False)
    except RuntimeError:  # a device without autocast
        off = contextlib.nullcontext()
    with off:
        return (p @ w).sum()


def size(entries: Iterable[CostEntry], other_params: int, scope: Scope, scale_bits: int = FP32_BITS) -> Size:
    """Size of the sites in `scope` (plus `other_params` FP32 parameters for TOTAL)."""
    scope = Scope(scope)
    weight_bits = step_bits = bias_bits = 0.0
    n_weights = n_bias = 0
    for e in entries:
        if scope is Scope.ENCODER and e.shape.kind is not SiteKind.ENCODER:
            continue
        p = e.probs if e.probs.dtype == torch.float64 else e.probs.float()  # [G, K]; exact sizes use float64
        w, s, b = candidate_bits(e.bits, e.shape, scale_bits, p.device, p.dtype)
        weight_bits = weight_bits + _dot(p, w)
        step_bits = step_bits + _dot(p, s)
        n_weights += e.shape.n_groups * e.shape.group_numel
        if scope is Scope.TOTAL:
            bias_bits = bias_bits + _dot(p, b)
            n_bias += e.shape.n_groups * e.shape.rows_per_group if e.shape.bias else 0
    if n_weights == 0:
        raise ValueError(f"no quantized sites in scope {scope.value!r}")
    if scope is Scope.ENCODER:
        return Size(bytes=(weight_bits + step_bits) / 8, avg_bits=weight_bits / n_weights, weights=n_weights)
    fixed_bits = FP32_BITS * other_params
    total_bits = weight_bits + step_bits + bias_bits + fixed_bits
    avg = (weight_bits + bias_bits + fixed_bits) / (n_weights + n_bias + other_params)
    return Size(bytes=total_bits / 8, avg_bits=avg, weights=n_weights + n_bias + other_params)


def bitops(entries: Iterable[CostEntry]) -> torch.Tensor:
    """Expected bit-operations per token: sum over groups of bits_w * bits_a * MACs.

    Only weight matmuls count (attention's activation-activation products and embeddings do not).
    """
    total = 0.0
    for e in entries:
        if e.shape.in_features == 0:
            continue
        wbits = torch.tensor([float(b) for b in e.bits], device=e.probs.device)
        macs_per_group = e.shape.rows_per_group * e.shape.in_features
        total = total + _dot(e.probs.float(), wbits) * macs_per_group * e.a_bits
    return torch.as_tensor(total)


def model_entries(model: "torch.nn.Module") -> list[CostEntry]:
    """Price every site of a supernet at its current (noise-free) candidate probabilities."""
    from .mixed import sites  # the cost model needs the sites; sites need SiteShape from here

    entries = []
    for _, site in sites(model):
        a_bits: torch.Tensor | float = float(FP32_BITS)
        if site.aq is not None and not site.aq.cands.is_identity:
            abits = torch.tensor([float(b) for b in site.aq.cands.bits], device=site.aq.step.device)
            a_bits = _dot(site.aq.mean_probs().float(), abits)  # [1, K] @ [K]
        entries.append(CostEntry(site.shape(), site.wq.cands.bits, site.wq.mean_probs(), a_bits))
    return entries


def expected_size(model: "torch.nn.Module", scope: Scope, scale_bits: int = FP32_BITS) -> Size:
    """Expected size of a supernet, differentiable in its logits."""
    from .params import other_fp32_params

    return size(model_entries(model), other_fp32_params(model), scope, scale_bits)


def expected_bitops(model: "torch.nn.Module") -> torch.Tensor:
    """Expected bit-operations per token of a supernet, differentiable in its logits."""
    return bitops(model_entries(model))
