"""Mixed-precision sites: MixedLinear and MixedEmbedding, and the quantizers they own.

Each site keeps ONE shared floating-point weight. Per group it holds a row of architecture logits
alpha[G, K] over K candidate bit-widths and a learnable LSQ step per group per candidate. Forward mixes
the *quantized weights* with the candidate probabilities and runs one matmul (EdMIPS, arXiv:2004.05795;
AQ-BERT, arXiv:2112.14938), so the cost of a step barely depends on K. Input activations pass through
their own quantizer (one candidate, or several with their own logits).

`fix(bits)` pins every group to one candidate: the supernet becomes the discrete quantized model that QAT,
evaluation and the baselines use. Pruning is the 0-bit candidate; a pruned group's bias goes too, so its
output features are exactly zero.
"""
from __future__ import annotations

import math
import weakref
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .groups import Grouping
from .quantizers import (
    MIN_STEP,
    CandidateKind,
    CandidateSet,
    InitRule,
    WEIGHT_GRIDS,
    QuantMode,
    candidate_kind,
    init_step,
    int_codes,
    lsq_grad_scale,
    mix_fake_quant,
)
from .cost import SiteShape
from .space import Relaxation, SiteKind


class _Chooser(nn.Module):
    """Candidates, their logits (when there is a choice) and an optional fixed choice per group."""

    def __init__(self, cands: CandidateSet, n_groups: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.cands = cands
        self.n_groups = n_groups
        k = len(cands)
        # on the device of the weights they serve: a model converted on the GPU stays whole there
        self.alpha = nn.Parameter(torch.zeros(n_groups, k, device=device)) if k > 1 else None
        self.register_buffer("choice", torch.full((n_groups,), -1, dtype=torch.long, device=device))
        self.relaxation = Relaxation.SOFTMAX
        self.tau = 1.0
        self._active: tuple[bool, ...] | None = None  # set while fixed: candidates some group uses
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh())

    @property
    def searchable(self) -> bool:
        return self.alpha is not None and self._active is None

    @property
    def fixed(self) -> bool:
        return self._active is not None

    def _refresh(self) -> None:
        used = set(self.choice.tolist())
        self._active = None if -1 in used else tuple(k in used for k in range(len(self.cands)))

    def probs(self) -> torch.Tensor:
        """[G, K] candidate probabilities of every group."""
        k = len(self.cands)
        if self._active is not None:
            return F.one_hot(self.choice, k).float()
        if self.alpha is None:
            return torch.ones(self.n_groups, 1, device=self.choice.device)
        if not self.training or self.relaxation is Relaxation.SOFTMAX:
            return torch.softmax(self.alpha / self.tau, dim=-1)
        return F.gumbel_softmax(self.alpha, tau=self.tau, hard=self.relaxation is Relaxation.GUMBEL_HARD, dim=-1)

    def mean_probs(self) -> torch.Tensor:
        """[G, K] probabilities without sampling noise: what the cost model charges for. Under Gumbel the mean of
        the samples, softmax(alpha) at any temperature (a hard sample is candidate k with that probability; the
        temperature only sharpens each sample), not softmax(alpha / tau), which priced another distribution."""
        if self.training and self.alpha is not None and self._active is None and self.relaxation is not Relaxation.SOFTMAX:
            return torch.softmax(self.alpha, dim=-1)
        return self.probs()

    def active(self) -> tuple[bool, ...] | None:
        return self._active

    def fix(self, bits: Sequence[int]) -> None:
        """Pin group g to the candidate with `bits[g]` bits."""
        if len(bits) != self.n_groups:
            raise ValueError(f"expected {self.n_groups} bit-widths (one per group), got {len(bits)}")
        odd = [b for b in bits if isinstance(b, bool) or int(b) != b]  # 2.5 would silently be 2
        if odd:
            raise ValueError(f"bit-widths are whole numbers, got {odd[:3]}")
        idx = [self.cands.index(int(b)) for b in bits]
        self.choice.copy_(torch.tensor(idx, dtype=torch.long))
        self._refresh()

    def unfix(self) -> None:
        self.choice.fill_(-1)
        self._active = None

    def chosen_bits(self) -> tuple[int, ...]:
        """Bits per group: the fixed choice, else the argmax of the logits."""
        if self._active is not None:
            idx = self.choice.tolist()
        elif self.alpha is None:
            idx = [0] * self.n_groups
        else:
            idx = self.alpha.detach().argmax(-1).tolist()
        return tuple(self.cands.bits[i] for i in idx)

    def keep_prob(self, probs: torch.Tensor) -> torch.Tensor | None:
        """[G] probability that each group is NOT pruned; None when pruning is not a candidate."""
        if 0 not in self.cands.bits:
            return None
        return 1 - probs[:, self.cands.index(0)]


class WeightQuantizer(_Chooser):
    """K candidate quantizers of one weight, a step per group per candidate (LSQ), on a signed grid:
    symmetric (integer levels) or mid-rise (levels half a step off the integers, no zero)."""

    def __init__(self, cands: CandidateSet, grouped: torch.Tensor, rule: InitRule) -> None:
        if cands.mode not in WEIGHT_GRIDS:
            raise ValueError(f"weight grid {cands.mode.value!r} is not signed; weights use "
                             f"{' or '.join(m.value for m in WEIGHT_GRIDS)}")
        super().__init__(cands, grouped.shape[0], grouped.device)
        self.group_numel = grouped.shape[1]
        step = torch.ones(self.n_groups, len(cands), device=grouped.device)
        for k, (b, kind) in enumerate(zip(cands.bits, cands.kinds)):
            if kind is CandidateKind.INT:
                step[:, k] = init_step(grouped, b, cands.mode, rule)[0]
        self.step = nn.Parameter(step)
        self.grad_scales = tuple(lsq_grad_scale(self.group_numel, b, cands.mode) for b in cands.bits)

    def mix(self, x: torch.Tensor, probs: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Mix the quantized copies of x; `shape` is how one group's [K] values broadcast against x."""
        k = len(self.cands)
        mix_probs = None if k == 1 else probs.t().reshape(k, *shape)  # [G, K] -> [K, *shape]
        return mix_fake_quant(x, mix_probs, self.step.t().reshape(k, *shape), self.cands, self.grad_scales, active=self.active())


class ActQuantizer(_Chooser):
    """Fake-quantizes a site's input activations; step (and offset) initialised on the first batch.

    One quantizer may serve several sites that read the same tensor (Q, K and V): the result for the
    last input is reused while that tensor is unchanged, so the work and the saved copy happen once.
    """

    def __init__(self, cands: CandidateSet, features: int, rule: InitRule, device: torch.device | str | None = None) -> None:
        super().__init__(cands, 1, device)
        k = len(cands)
        self.rule = rule
        self.step = nn.Parameter(torch.ones(1, k, device=device))
        self.offset = nn.Parameter(torch.zeros(1, k, device=device)) if cands.mode is QuantMode.ASYMMETRIC else None
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
        self._initialized = False
        self.grad_scales = tuple(lsq_grad_scale(features, b, cands.mode) for b in cands.bits)
        # (weak input, _key(input), weak output): weak, so no step's tensors outlive it
        self._last: tuple | None = None

    def _key(self, x: torch.Tensor) -> tuple:
        """What the output for input `x` depends on beside x's identity: x's contents (its version), grad mode,
        training, and this quantizer's own state (steps, offsets, logits, fixed choice, relaxation)."""
        own = tuple(p._version for p in (self.step, self.offset, self.alpha, self.choice) if p is not None)
        return (x._version, torch.is_grad_enabled(), self.training, own, self.tau, self.relaxation, self._active)

    def _refresh(self) -> None:
        super()._refresh()
        self._initialized = bool(self.initialized)

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(1, -1)  # [*, features] -> [1, n]
        for k, (b, kind) in enumerate(zip(self.cands.bits, self.cands.kinds)):
            if kind is CandidateKind.INT:
                step, offset = init_step(flat, b, self.cands.mode, self.rule, max_samples=65536)
                self.step[0, k] = step[0]
                if self.offset is not None:
                    self.offset[0, k] = offset[0]
        self.initialized.fill_(True)
        self._initialized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cands.is_identity:
            return x
        key = self._key(x)
        if self._last is not None and self._last[0]() is x and self._last[1] == key:
            cached = self._last[2]()
            if cached is not None:
                return cached
        if not self._initialized:
            self._init_from(x)
        k = len(self.cands)
        shape = (k,) + (1,) * x.dim()
        offsets = None if self.offset is None else self.offset.reshape(shape)
        dtype = x.dtype
        probs = None if k == 1 else self.probs().reshape(shape)  # [1, K] -> [K, 1, ..., 1]
        y = mix_fake_quant(x.float(), probs, self.step.reshape(shape), self.cands, self.grad_scales, offsets, self.active()).to(dtype)
        # the next sites of the same layer read the same tensor; only a searched quantizer with Gumbel noise
        # would want a fresh sample per site, and sharing one sample is the same model
        self._last = (weakref.ref(x), self._key(x), weakref.ref(y))  # after a first batch's init changed the steps
        return y


class MixedLinear(nn.Linear):
    """nn.Linear with mixed-precision weights (groups along output rows) and quantized inputs."""

    def __init__(self, linear: nn.Linear, kind: SiteKind, wcands: CandidateSet, grouping: Grouping,
                 acands: CandidateSet | ActQuantizer | None, rule: InitRule) -> None:
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        self.weight = linear.weight  # the very same Parameter: optimisers and tied weights stay valid
        self.bias = linear.bias
        self.kind = kind
        self.grouping = grouping
        self.wq = WeightQuantizer(wcands, self.to_groups(self.weight.detach()), rule)
        if isinstance(acands, ActQuantizer) or acands is None:
            self.aq = acands  # shared with the sites that read the same input
        else:
            self.aq = ActQuantizer(acands, self.in_features, rule, self.weight.device)

    def shape(self) -> SiteShape:
        g = self.grouping
        return SiteShape(self.kind, g.n_groups, self.wq.group_numel, g.size, self.in_features, self.bias is not None)

    def to_groups(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like the weight, cut into this site's groups."""
        return t.reshape(self.grouping.n_groups, -1)  # [out, in] -> [G, rows/G * in]

    def from_groups(self, grouped: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_groups`."""
        return grouped.reshape(self.out_features, self.in_features)  # [G, rows/G * in] -> [out, in]

    def quantized_weight(self, probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mixed fake-quantized weight [out, in], bias with pruned groups removed)."""
        probs = self.wq.probs() if probs is None else probs
        g = self.grouping.n_groups
        if self.wq.cands.is_identity:
            w = self.weight
        else:
            w = self.wq.mix(self.weight.view(g, -1), probs, (g, 1)).view_as(self.weight)  # [G, n] -> [out, in]
        bias = self.bias
        keep = self.wq.keep_prob(probs)
        if bias is not None and keep is not None:
            bias = bias * keep.to(bias.dtype).repeat_interleave(self.grouping.size)  # [G] -> [out]
        return w, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.aq is not None:
            x = self.aq(x)
        w, bias = self.quantized_weight()
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w_bits={list(self.wq.cands.bits)}, groups={self.grouping.n_groups}, kind={self.kind.value}"


class MixedEmbedding(nn.Embedding):
    """nn.Embedding with mixed-precision tables; groups along the embedding dimension.

    Quantization is elementwise with one step per group of columns, so quantizing the looked-up rows
    equals looking up rows of the quantized table, at a fraction of the cost.
    """

    def __init__(self, emb: nn.Embedding, wcands: CandidateSet, grouping: Grouping, rule: InitRule) -> None:
        super().__init__(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, emb.max_norm, emb.norm_type,
                         emb.scale_grad_by_freq, emb.sparse, device="meta")
        self.weight = emb.weight
        self.kind = SiteKind.EMBEDDING
        self.grouping = grouping
        self.bias = None
        self.aq = None
        self.wq = WeightQuantizer(wcands, self.to_groups(self.weight.detach()), rule)

    def shape(self) -> SiteShape:
        g = self.grouping
        return SiteShape(self.kind, g.n_groups, self.wq.group_numel, g.size, 0, False)

    def to_groups(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like the table, cut into this site's groups of columns."""
        return t.t().reshape(self.grouping.n_groups, -1)  # [V, D] -> [D, V] -> [G, D/G * V]

    def from_groups(self, grouped: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_groups`."""
        return grouped.reshape(self.embedding_dim, self.num_embeddings).t()  # [G, D/G * V] -> [D, V] -> [V, D]

    def quantized_weight(self, probs: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """The whole mixed fake-quantized table [V, D] (for export and inspection; forward avoids it)."""
        return self._mix_rows(self.weight, probs), None

    def _mix_rows(self, rows: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
        if self.wq.cands.is_identity:
            return rows
        probs = self.wq.probs() if probs is None else probs
        g = self.grouping.n_groups
        grouped = rows.reshape(*rows.shape[:-1], g, self.grouping.size)  # [..., D] -> [..., G, D/G]
        return self.wq.mix(grouped, probs, (g, 1)).reshape(rows.shape)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)  # [..., D]
        return self._mix_rows(rows)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w_bits={list(self.wq.cands.bits)}, groups={self.grouping.n_groups}"


Site = MixedLinear | MixedEmbedding


def sites(model: nn.Module) -> Iterator[tuple[str, Site]]:
    """(name, module) of every mixed-precision site, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, (MixedLinear, MixedEmbedding)):
            yield name, module


@torch.no_grad()
def fixed_codes(site: Site) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of a site fixed to one candidate per group: ([G, 1] the chosen candidate's step, clamped as the forward
    clamps it; [G, n] the integer codes of its weights, exactly the forward's; [G] True where the group is
    integer-quantized). Codes of pruned and float groups are 0; values are `dequantize(codes, steps, mode)`."""
    grouped = site.to_groups(site.weight.detach()).float()
    bits = torch.tensor(site.wq.cands.bits, device=grouped.device)[site.wq.choice]  # [G]
    steps = site.wq.step.detach().float().gather(1, site.wq.choice[:, None]).clamp_min(MIN_STEP)  # [G, 1]
    codes = torch.zeros_like(grouped)
    quantized = torch.zeros_like(bits, dtype=torch.bool)
    for b in bits.unique().tolist():
        if candidate_kind(b) is not CandidateKind.INT:
            continue
        idx = (bits == b).nonzero().flatten()
        codes[idx] = int_codes(grouped[idx], steps[idx], b, site.wq.cands.mode)
        quantized[idx] = True
    return steps, codes, quantized


def set_relaxation(model: nn.Module, relaxation: Relaxation, tau: float) -> None:
    """Set how every site turns logits into probabilities, and the temperature."""
    if not 0 < tau < math.inf:  # NaN too: every probability would be NaN
        raise ValueError(f"temperature must be a positive number, got {tau}")
    for module in model.modules():
        if isinstance(module, _Chooser):
            module.relaxation = Relaxation(relaxation)
            module.tau = float(tau)
