"""Uniform fake quantizers with a learned step size, one at a time or K mixed at once.

Follows LSQ (Esser et al., arXiv:1902.08153): q(x) = round(clamp(x / s, qmin, qmax)) * s with a
straight-through round and the step gradient scaled by 1 / sqrt(n * Q_p) (Q_p: the top level, in steps);
LSQ+ adds a learned offset for asymmetric activations. The mid-rise grid shifts the signed codes by half a
step, q(x) = (round(clamp(x / s - 1/2, qmin, qmax)) + 1/2) * s: the same 2**bits codes, levels symmetric
about zero and none at zero (2 bits: {-3/2, -1/2, 1/2, 3/2} * s; 1 bit: +-s/2, binary weights).
Candidate bit-widths:
  * 0        -> exact zeros (the group is pruned),
  * 1        -> a sign times a step (the mid-rise grid only),
  * 2 .. 8   -> a uniform grid of 2**bits levels,
  * 16       -> IEEE half precision (x rounded to float16, straight-through), what its 16 bits store,
  * 32       -> the identity.

`mix_fake_quant` is the hot path of the supernet: sum_k p_k * q_k(x) for all K candidates in one
autograd node that saves only its inputs and recomputes the candidates in backward, so memory does not
grow with K (EdMIPS mixes quantized weights the same way). `lsq_fake_quant` is the plain-autograd
reference for one candidate; tests check the fused node against it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch

FLOAT_BITS = (16, 32)
INT_BITS = tuple(range(2, 9))
MIN_STEP = 1e-8


class QuantMode(Enum):
    """Integer grid of a quantizer."""

    SYMMETRIC = "symmetric"  # signed, [-2^(b-1), 2^(b-1) - 1]; the default weight grid
    UNSIGNED = "unsigned"  # [0, 2^b - 1], zero offset
    ASYMMETRIC = "asymmetric"  # [0, 2^b - 1] shifted by a learned offset (LSQ+)
    MIDRISE = "midrise"  # the signed codes plus one half: (c + 1/2) * s, symmetric, no zero level


WEIGHT_GRIDS = (QuantMode.SYMMETRIC, QuantMode.MIDRISE)  # the signed grids a weight can use
MIDRISE_BITS = 1  # the bit-width only the mid-rise grid has (a 1-bit signed integer grid is {-1, 0})


def is_float_bits(value: object) -> bool:
    """Whether `value` is a float width a value is stored in (16 or 32; not 16.0 or True)."""
    return isinstance(value, int) and not isinstance(value, bool) and value in FLOAT_BITS


def half(mode: QuantMode) -> float:
    """The shift of a grid's levels from its integer codes: value = (code + half) * step (+ offset)."""
    return 0.5 if QuantMode(mode) is QuantMode.MIDRISE else 0.0


def top_level(bits: int, mode: QuantMode) -> float:
    """The largest level in steps, qmax + half: LSQ's Q_p."""
    return qrange(bits, mode)[1] + half(mode)


class InitRule(Enum):
    """How a step size is initialised from the tensor it quantizes."""

    MSE = "mse"  # clipping range minimising ||q(x) - x||^2 over a grid (best at 2-3 bits)
    MAX_ABS = "max_abs"  # no clipping: the grid spans the tensor's range
    LSQ = "lsq"  # the LSQ paper's 2 * mean|x| / sqrt(qmax)


class CandidateKind(Enum):
    ZERO = "zero"
    INT = "int"
    FLOAT = "float"


def check_bits(bits: int) -> int:
    """Return `bits` if it is a supported candidate of some grid, else raise a one-line ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"bit-width {bits!r} is not an integer; use 0 (pruned), 1 (mid-rise grid), 2..8, 16 or 32")
    if bits != 0 and bits != MIDRISE_BITS and bits not in INT_BITS and bits not in FLOAT_BITS:
        raise ValueError(f"bit-width {bits} is not supported; use 0 (pruned), 1 (mid-rise grid only), 2..8, "
                         f"16 or 32 (float)")
    return bits


def check_grid(bits: int, mode: QuantMode) -> None:
    """A one-line ValueError where `bits` has no grid in `mode` (1 bit is mid-rise only)."""
    if bits == MIDRISE_BITS and mode is not QuantMode.MIDRISE:
        raise ValueError(f"1-bit candidates need the mid-rise grid (levels +-s/2); a {mode.value} 1-bit grid is "
                         f"degenerate. Set the grid to midrise or drop the 1")


def candidate_kind(bits: int) -> CandidateKind:
    check_bits(bits)
    if bits == 0:
        return CandidateKind.ZERO
    return CandidateKind.FLOAT if bits in FLOAT_BITS else CandidateKind.INT


def qrange(bits: int, mode: QuantMode) -> tuple[int, int]:
    """Integer range [qmin, qmax] of a `bits`-bit grid's codes: 2**bits of them."""
    mode = QuantMode(mode)  # "symmetric" as well as QuantMode.SYMMETRIC: a string once fell through to unsigned
    if candidate_kind(bits) is not CandidateKind.INT:
        raise ValueError(f"{bits} bits has no integer grid")
    check_grid(bits, mode)
    if mode in (QuantMode.SYMMETRIC, QuantMode.MIDRISE):
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@dataclass(frozen=True)
class CandidateSet:
    """The K candidate bit-widths of one quantizer, with their grids."""

    bits: tuple[int, ...]
    mode: QuantMode = QuantMode.SYMMETRIC

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", QuantMode(self.mode))  # "midrise" as well as QuantMode.MIDRISE
        object.__setattr__(self, "bits", tuple(self.bits))
        if not self.bits:
            raise ValueError("a candidate set needs at least one bit-width")
        for b in self.bits:
            check_bits(b)
        if len(set(self.bits)) != len(self.bits):
            raise ValueError(f"candidate bit-widths repeat: {list(self.bits)}")
        for b in self.bits:
            check_grid(b, self.mode)

    def __len__(self) -> int:
        return len(self.bits)

    @property
    def kinds(self) -> tuple[CandidateKind, ...]:
        return tuple(candidate_kind(b) for b in self.bits)

    def ranges(self) -> tuple[tuple[int, int], ...]:
        """(qmin, qmax) per candidate; (0, 0) for zero and float candidates."""
        return tuple(qrange(b, self.mode) if k is CandidateKind.INT else (0, 0) for b, k in zip(self.bits, self.kinds))

    def index(self, bits: int) -> int:
        if bits not in self.bits:
            raise ValueError(f"{bits} bits is not a candidate here (candidates: {list(self.bits)})")
        return self.bits.index(bits)

    @property
    def is_identity(self) -> bool:
        """A lone FP32 candidate: nothing to quantize (a lone 16-bit one still rounds to half precision)."""
        return self.bits == (FLOAT_BITS[-1],)


def lsq_grad_scale(numel: int, bits: int, mode: QuantMode) -> float:
    """LSQ's step gradient scale 1 / sqrt(N * Q_p); 0 where the candidate has no step."""
    if candidate_kind(bits) is not CandidateKind.INT:
        return 0.0
    return 1.0 / math.sqrt(max(numel, 1) * top_level(bits, mode))


class _RoundSTE(torch.autograd.Function):
    """round() whose gradient is the identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return _RoundSTE.apply(x)


def float_value(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The value a float candidate stores: x rounded to float16 for 16 bits, x itself for 32 (no autograd)."""
    return x.to(torch.float16).to(x.dtype) if bits == FLOAT_BITS[0] else x


def int_codes(x: torch.Tensor, step: torch.Tensor, bits: int, mode: QuantMode = QuantMode.SYMMETRIC,
              offset: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes round(clamp((x - offset) / step - half)) as floats, with exactly the fake quantizer's
    arithmetic.

    `step` (and `offset`) broadcast against x, one value per group. q(x) = dequantize(codes, step, mode,
    offset), so a packed export that stores these codes and steps rebuilds the quantized weights bit for bit.
    """
    qmin, qmax = qrange(bits, mode)
    return _to_grid(x, step.clamp_min(MIN_STEP), offset, half(mode)).clamp_(qmin, qmax).round_()


def dequantize(codes: torch.Tensor, step: torch.Tensor, mode: QuantMode = QuantMode.SYMMETRIC,
               offset: torch.Tensor | None = None) -> torch.Tensor:
    """The values of integer `codes`: (codes + half) * step (+ offset), the fake quantizer's arithmetic."""
    h = half(mode)
    value = (codes + h if h else codes) * step
    return value if offset is None else value + offset


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in forward; multiplies the gradient by `scale` in backward (LSQ's trick)."""
    return (x - x * scale).detach() + x * scale


def lsq_fake_quant(
    x: torch.Tensor,
    step: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_scale: float = 1.0,
    offset: torch.Tensor | None = None,
    shift: float = 0.0,
) -> torch.Tensor:
    """Reference LSQ(+) fake quantizer written with plain autograd (one candidate); `shift` is the grid's
    `half` (0.5 for the mid-rise grid)."""
    s = scale_grad(step, grad_scale).clamp_min(MIN_STEP)
    o = scale_grad(offset, grad_scale) if offset is not None else 0.0
    return (round_ste(torch.clamp((x - o) * s.reciprocal() - shift, qmin, qmax)) + shift) * s + o


def _to_grid(x: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None, h: float = 0.0) -> torch.Tensor:
    """v = (x - o) / s - h as a multiply by 1/s (a vector multiply is cheaper than a divide on CPUs)."""
    inv = s.reciprocal()
    v = (x - o) * inv if o is not None else x * inv
    return v.sub_(h) if h else v


def _group_dot(a: torch.Tensor, b: torch.Tensor, bshape: torch.Size) -> torch.Tensor:
    """sum(a * b) reduced to `bshape` (one value per group), without an a*b temporary where possible."""
    if all(d == 1 for d in bshape):
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(bshape)
    if bshape[-1] == 1:  # groups never split the last axis: a fused dot along it, then sum the rest
        return torch.linalg.vecdot(a, b, dim=-1).sum_to_size(bshape[:-1]).reshape(bshape)  # [..., G] -> [G, 1]
    return (a * b).sum_to_size(bshape)


class _MixFakeQuant(torch.autograd.Function):
    """y = sum_k p_k * q_k(x), saving only the inputs; candidates are recomputed in backward.

    Per integer candidate with codes c = round(clamp(v)), v = (x - o) / s - h (h: the grid's `half`), and
    `inside` where v lies in [qmin, qmax]; g is the incoming gradient and g_in = g where inside, else 0:
      dL/dx  = sum_k p_k g_in                                (STE through round, zero outside the clamp)
      dL/dp_k = s_k <g, c + h> + o_k <g, 1>                   (q_k = s_k (c + h) + o_k, s_k constant per group)
      dL/ds_k = p_k (<g, c + h> - <g_in, clamp(v) + h>)      (LSQ: round(v) - v inside, the bound + h outside)
      dL/do_k = p_k (<g, 1> - <g_in, 1>)                     (LSQ+: zero inside, one outside)
    with <.,.> summed within each group; the step and offset gradients then take LSQ's scale.
    """

    @staticmethod
    def forward(ctx, x, probs, steps, offsets, cands: CandidateSet, grad_scales: tuple[float, ...], active):
        ctx.cands, ctx.grad_scales, ctx.active = cands, grad_scales, active
        has_offsets = offsets is not None
        ctx.has_offsets = has_offsets
        unit = probs is None  # a lone candidate with probability one: no multiplies
        ctx.unit = unit
        ctx.save_for_backward(x, steps if unit else probs, steps, offsets if has_offsets else steps)
        out = None
        h = half(cands.mode)
        for k, (kind, (qmin, qmax)) in enumerate(zip(cands.kinds, cands.ranges())):
            if kind is CandidateKind.ZERO or not active[k]:
                continue
            if kind is CandidateKind.FLOAT:
                value = float_value(x, cands.bits[k])
                term = (value.clone() if value is x else value) if unit else value * probs[k]
                out = term if out is None else out.add_(term)
                continue
            s = steps[k].clamp_min(MIN_STEP)
            o = offsets[k] if has_offsets else None
            codes = _to_grid(x, s, o, h).clamp_(qmin, qmax).round_()  # in place: a fresh tensor (see int_codes)
            if h:
                codes.add_(h)  # the levels
            scale = s if unit else s * probs[k]  # [*b]: fold the probability into the step
            if out is None:
                out = codes.mul_(scale)
            else:
                out.addcmul_(codes, scale)
            if o is not None:
                out.add_(o if unit else o * probs[k])
        return torch.zeros_like(x) if out is None else out

    @staticmethod
    def backward(ctx, grad):
        x, probs, steps, offsets = ctx.saved_tensors
        need_x, need_p, need_s, need_o = ctx.needs_input_grad[:4]
        unit = ctx.unit
        need_p = need_p and not unit
        grad = grad.contiguous()
        bshape = steps.shape[1:]
        gx = None  # starts as the first candidate's term: no zeros-then-add pass
        gp = torch.zeros_like(probs) if need_p else None  # probs is a placeholder when unit
        gs = torch.zeros_like(steps) if need_s else None
        go = torch.zeros_like(offsets) if (need_o and ctx.has_offsets) else None
        grad_sum = grad.sum_to_size(bshape) if (go is not None or (need_p and ctx.has_offsets)) else None
        h = half(ctx.cands.mode)
        for k, (kind, (qmin, qmax)) in enumerate(zip(ctx.cands.kinds, ctx.cands.ranges())):
            if kind is CandidateKind.ZERO or not ctx.active[k]:
                continue
            p = probs[k]
            if kind is CandidateKind.FLOAT:
                if need_x:
                    gx = _accumulate(gx, grad, None if unit else p)
                if need_p:
                    gp[k] = _group_dot(grad, float_value(x, ctx.cands.bits[k]), bshape)
                continue
            s = steps[k].clamp_min(MIN_STEP)
            o = offsets[k] if ctx.has_offsets else None
            v = _to_grid(x, s, o, h)
            vc = v.clamp(qmin, qmax)
            inside = v == vc
            del v
            codes = torch.round(vc)
            if h:  # the levels, and clamp(v) + h, so that their difference stays round(v) - v
                codes.add_(h)
                vc.add_(h)
            g_codes = _group_dot(grad, codes, bshape) if (need_p or need_s) else None
            del codes
            g_in = torch.where(inside, grad, 0.0)
            del inside
            if need_x:
                gx = _accumulate(gx, g_in, None if unit else p)
            if need_p:
                gp[k] = s * g_codes + (o * grad_sum if o is not None else 0)
            if need_s:
                gs[k] = (g_codes - _group_dot(g_in, vc, bshape)) * (1 if unit else p) * ctx.grad_scales[k] * (steps[k] >= MIN_STEP)
            if go is not None:
                go[k] = (grad_sum - g_in.sum_to_size(bshape)) * (1 if unit else p) * ctx.grad_scales[k]
        if need_x and gx is None:  # every candidate pruned or inactive
            gx = torch.zeros_like(x)
        return gx, gp, gs, go, None, None, None


def _accumulate(total: torch.Tensor | None, term: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """total + weight * term, reusing `term`'s storage for the first term when there is no weight."""
    if total is None:
        return term if weight is None else term * weight
    return total.add_(term) if weight is None else total.addcmul_(term, weight)


def mix_fake_quant(
    x: torch.Tensor,
    probs: torch.Tensor | None,
    steps: torch.Tensor,
    cands: CandidateSet,
    grad_scales: tuple[float, ...],
    offsets: torch.Tensor | None = None,
    active: tuple[bool, ...] | None = None,
) -> torch.Tensor:
    """Mix the K fake-quantized copies of `x`: sum_k probs[k] * q_k(x).

    probs, steps, offsets: [K, *b] with `b` broadcastable to x.shape (one value per group); probs=None
    for a single candidate taken with probability one (a fixed precision), which skips the multiplies.
    active: candidates to evaluate (a fixed architecture skips the ones no group uses).
    """
    if (probs is not None and probs.shape[0] != len(cands)) or steps.shape[0] != len(cands):
        raise ValueError(f"expected {len(cands)} candidates, got probs {None if probs is None else tuple(probs.shape)}, steps {tuple(steps.shape)}")
    if probs is None and len(cands) != 1:
        raise ValueError("probs=None needs exactly one candidate")
    active = tuple(True for _ in cands.bits) if active is None else active
    return _MixFakeQuant.apply(x, None if probs is None else probs.to(x.dtype), steps.to(x.dtype), None if offsets is None else offsets.to(x.dtype), cands, tuple(grad_scales), active)


@torch.no_grad()
def init_step(
    x: torch.Tensor,
    bits: int,
    mode: QuantMode = QuantMode.SYMMETRIC,
    rule: InitRule = InitRule.MSE,
    max_samples: int = 8192,
    grid: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial (step, offset) per group for `x` of shape [G, n].

    MSE searches the clipping ratio r in (0, 1] of the group's range that minimises the quantization
    error (LSQ's own init clips too little at 2 bits, max-abs wastes levels on outliers). Groups larger
    than `max_samples` are estimated on an evenly strided subsample.
    """
    mode = QuantMode(mode)
    qmin, qmax = qrange(bits, mode)
    x = x.detach().float()
    if x.shape[1] > max_samples:
        stride = x.shape[1] // max_samples
        x = x[:, ::stride]  # [G, n] -> [G, <= 2 * max_samples]
    lo = None  # only the asymmetric grid has an offset
    if mode is QuantMode.ASYMMETRIC:
        lo = x.amin(1)
        span = (x.amax(1) - lo).clamp_min(MIN_STEP)
    elif mode is QuantMode.UNSIGNED:
        span = x.amax(1).clamp_min(MIN_STEP)
    else:
        span = x.abs().amax(1).clamp_min(MIN_STEP)
    h = half(mode)
    levels = qmax - qmin if mode in (QuantMode.UNSIGNED, QuantMode.ASYMMETRIC) else top_level(bits, mode)

    def at(ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        step = (ratio * span / levels).clamp_min(MIN_STEP)
        if lo is None:
            return step, torch.zeros_like(step)
        return step, lo + (1 - ratio) * span / 2  # clip both tails equally

    if rule is InitRule.MAX_ABS:
        return at(torch.ones_like(span))
    if rule is InitRule.LSQ:
        step = (2 * x.abs().mean(1) / math.sqrt(top_level(bits, mode))).clamp_min(MIN_STEP)
        return step, (lo if lo is not None else torch.zeros_like(step))
    best_err = torch.full_like(span, float("inf"))
    best_step, best_offset = at(torch.ones_like(span))
    for r in torch.linspace(1.0 / grid, 1.0, grid).tolist():
        step, offset = at(torch.full_like(span, r))
        q = (torch.round((x - offset[:, None]) / step[:, None] - h).clamp(qmin, qmax) + h) * step[:, None] + offset[:, None]
        err = (q - x).pow(2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_step = torch.where(better, step, best_step)
        best_offset = torch.where(better, offset, best_offset)
    return best_step, best_offset


@torch.no_grad()
def group_errors(grouped: torch.Tensor, steps: torch.Tensor, bits: tuple[int, ...] | list[int],
                 weight: torch.Tensor | None = None, mode: QuantMode = QuantMode.SYMMETRIC) -> torch.Tensor:
    """[G, K] squared error sum_i w_i (Q_k(x_i) - x_i)^2 of each group of `grouped` [G, n] at each candidate
    bit-width, with the weight quantizer's grid `mode` and steps [G, K] (unused by the zero and float candidates)
    and optional per-element factors `weight` [G, n] (1 when None). A pruned group's error is its whole
    weight, a float one's its rounding (none at 32 bits). In the dtype of `grouped`."""
    x = grouped.detach()
    cols = []
    for k, b in enumerate(bits):
        kind = candidate_kind(b)
        if kind is CandidateKind.ZERO:
            err = x
        elif kind is CandidateKind.FLOAT:
            err = float_value(x, b) - x
        else:
            step = steps[:, k : k + 1].detach().to(x.dtype).clamp_min(MIN_STEP)  # [G, 1]
            err = dequantize(int_codes(x, step, b, mode), step, mode) - x
        sq = err.pow(2)
        cols.append((sq if weight is None else sq * weight).sum(1))
    return torch.stack(cols, 1)
