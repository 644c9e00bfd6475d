"""HAWQ-V2's activation precision (arXiv:1911.03852, section 3.3): the same Hessian-aware sensitivity, taken
with respect to each quantized input activation, and the same exact allocation.

For every activation quantizer (Q, K and V share one: they read the same tensor) a zero tensor e is added
to its input, x + e, and Hutchinson's estimator runs on the Hessian of the task loss with respect to e at
e = 0: the loss as a function of that activation, through everything downstream. Per quantizer:
    Omega_b = (trace / elements) * ||Q_b(x) - x||^2,
with Q_b the quantizer the supernet uses, its step initialised on x exactly as `ActQuantizer` does on its
first batch. Activation bits are not model size, so they take a budget of their own: the average bits per
activation element, weighted by each quantizer's input width (`hawq.a_avg_bits`); the multiple-choice
knapsack (search/knapsack.py) picks the least total Omega within it. Each batch is a Hessian of its own
(the activations' shapes differ between batches); the traces are averaged over batches.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from supernet import Architecture, init_step, lsq_fake_quant, qrange, sites
from supernet.mixed import ActQuantizer
from supernet.quantizers import CandidateKind, candidate_kind

from .bilevel import task_loss
from .config import NegativeCurvature
from .hessian import Hessian, hutchinson
from .knapsack import Knapsack

__all__ = ["ActSite", "activation_sites", "activation_traces", "activation_knapsack", "activation_width",
           "with_activation_bits"]

Batch = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ActSite:
    """One activation quantizer: the sites that read its tensor, its candidates and input width."""

    names: tuple[str, ...]
    quantizer: ActQuantizer
    in_features: int

    @property
    def name(self) -> str:
        return self.names[0]


def activation_sites(supernet: nn.Module) -> list[ActSite]:
    """Every distinct input quantizer of the supernet with the sites sharing it, in model order."""
    found: dict[int, list[str]] = {}
    quantizers: dict[int, tuple[ActQuantizer, int]] = {}
    for name, site in sites(supernet):
        aq = site.aq
        if aq is None or aq.cands.is_identity:
            continue
        found.setdefault(id(aq), []).append(name)
        quantizers[id(aq)] = (aq, site.in_features)
    return [ActSite(tuple(names), *quantizers[key]) for key, names in found.items()]


def _inputs(fp_model: nn.Module, acts: Sequence[ActSite], batch: Batch, perturb: Sequence[torch.Tensor] | None,
            loss_fn: Callable[[nn.Module, Batch], torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss with `perturb[i]` added to every input of quantizer i (None: nothing added), and the inputs."""
    seen: list[torch.Tensor | None] = [None] * len(acts)
    handles = []
    for i, act in enumerate(acts):
        for name in act.names:
            def hook(module, args, i=i):
                x = args[0]
                if seen[i] is None:
                    seen[i] = x.detach()
                return (x + perturb[i],) + tuple(args[1:]) if perturb is not None else None
            handles.append(fp_model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        loss = loss_fn(fp_model, batch)
    finally:
        for h in handles:
            h.remove()
    return loss, [x for x in seen if x is not None]


def activation_traces(fp_model: nn.Module, supernet: nn.Module, batches: Iterable[Batch], *, max_probes: int,
                      tol: float, seed: int, loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = task_loss,
                      progress: bool = False) -> dict[str, tuple[float, list[float]]]:
    """Per quantizer (named by its first site): (mean trace per element, squared errors per candidate), both
    averaged over `batches`. `fp_model` is the unconverted model (eval mode, eager attention, as for weights)."""
    acts = activation_sites(supernet)
    fp_model.eval()
    if hasattr(fp_model, "set_attn_implementation"):
        fp_model.set_attn_implementation("eager")  # fused attention kernels have no double backward
    for p in fp_model.parameters():
        p.requires_grad_(False)
    device = next(fp_model.parameters()).device
    traces = np.zeros(len(acts))
    errors = [np.zeros(len(a.quantizer.cands)) for a in acts]
    n = 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            _, xs = _inputs(fp_model, acts, batch, None, loss_fn)
        es = [torch.zeros_like(x, requires_grad=True) for x in xs]
        hessian = Hessian([lambda: _inputs(fp_model, acts, batch, es, loss_fn)[0]], es)
        est = hutchinson(hessian, [lambda t: t.reshape(1, -1)] * len(es), max_probes=max_probes, tol=tol, seed=seed + n,
                         progress=progress, desc=f"activation traces, batch {n + 1}")
        traces += np.array([float(m[0]) / x.numel() for m, x in zip(est.mean(), xs)])  # [1] -> per element
        for i, (act, x) in enumerate(zip(acts, xs)):
            errors[i] += _errors(act.quantizer, x)
        n += 1
    if n == 0:
        raise ValueError("activation traces need at least one batch")
    return {a.name: (float(t / n), (e / n).tolist()) for a, t, e in zip(acts, traces, errors)}


@torch.no_grad()
def _errors(aq: ActQuantizer, x: torch.Tensor) -> np.ndarray:
    """[K] ||Q_b(x) - x||^2 with the step (and offset) ActQuantizer would initialise from x."""
    flat = x.float().reshape(1, -1)  # [*, features] -> [1, n]
    out = []
    for b, kind in zip(aq.cands.bits, aq.cands.kinds):
        if kind is not CandidateKind.INT:
            out.append(0.0 if candidate_kind(b) is CandidateKind.FLOAT else float(flat.pow(2).sum()))
            continue
        step, offset = init_step(flat, b, aq.cands.mode, aq.rule, max_samples=65536)
        q = lsq_fake_quant(flat, step[:, None], *qrange(b, aq.cands.mode),
                           offset=offset[:, None] if aq.offset is not None else None)
        out.append(float((q - flat).pow(2).sum()))
    return np.array(out)


def activation_knapsack(supernet: nn.Module, measured: Mapping[str, tuple[float, list[float]]],
                        negative: NegativeCurvature = NegativeCurvature.floor) -> Knapsack:
    """One 'group' per quantizer: Omega per candidate, priced at bits x input width (bits per token). A
    negative trace counts as no loss, or by its magnitude with `NegativeCurvature.absolute` (as the weights'
    curvature does in `search.hawq.build_knapsack`)."""
    names, bits, values, prices = [], [], [], []
    for act in activation_sites(supernet):
        trace, errs = measured[act.name]
        curvature = abs(trace) if negative is NegativeCurvature.absolute else max(trace, 0.0)
        cands = act.quantizer.cands.bits
        order = sorted(range(len(cands)), key=lambda k: cands[k])
        names.append(act.name)
        bits.append(tuple(cands[k] for k in order))
        values.append(np.array([[curvature * errs[k] for k in order]]))  # [1, K]
        prices.append(np.array([float(cands[k] * act.in_features) for k in order]))
    return Knapsack(tuple(names), tuple(bits), tuple(values), tuple(prices), 0.0)


def activation_width(supernet: nn.Module) -> int:
    """Activation elements per token over all quantizers: the knapsack's cost of one bit per element (so an
    average of `a` bits per element is a budget of `a * width`)."""
    return sum(a.in_features for a in activation_sites(supernet))


def with_activation_bits(arch: Architecture, supernet: nn.Module, knapsack: Knapsack,
                         choice: Sequence[np.ndarray]) -> Architecture:
    """`arch` with every site's activation bits as chosen (the sites sharing a quantizer alike)."""
    chosen = {n: knapsack.bits[i][int(c[0])] for i, (n, c) in enumerate(zip(knapsack.names, choice))}
    per_site = {name: chosen[act.name] for act in activation_sites(supernet) for name in act.names}
    return dataclasses.replace(arch, sites=tuple((n, dataclasses.replace(s, a_bits=per_site.get(n, s.a_bits)))
                                                 for n, s in arch))
