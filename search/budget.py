"""Size budgets: what the user asks for, checked against what the space can reach, as a limit and a penalty.

A budget is an average number of bits per weight (`avg_bits`) or a size in MiB (`mb`) in a scope
(`encoder` weights, or the `total` model), measured exactly as `supernet.cost` defines size. The same
object checks at start-up that the space can reach it (an impossible budget fails in a second, not after
an hour of search), tells whether a discrete Architecture fits, gives derivation and HAWQ-V2 the per-group
price of every candidate, and turns the supernet's expected size into the search's size penalty
(AQ-BERT, arXiv:2112.14938: task loss + a model-size term that lands on the budget).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from supernet import MIB, Architecture, Scope, SiteArch, SiteKind, candidate_bits, sites
from supernet.cost import FP32_BITS, Size

from .errors import UserError

TOLERANCE = 1e-9
log = logging.getLogger(__name__)


class BudgetError(UserError, ValueError):
    """A budget that cannot be met (or is not well-formed): the user's to fix, reported in one line."""


class Penalty(Enum):
    """How the expected size enters the architecture loss; r = expected / budget. Lower-case member
    names: they are what users type (`search.penalty=hinge`)."""

    hinge = "hinge"  # lambda * max(0, r - 1): free below the budget
    log_ratio = "log_ratio"  # lambda * log(r)^2: pulled onto the budget from both sides
    linear = "linear"  # lambda * r: a plain size weight, no target


@dataclass(frozen=True)
class Budget:
    """Exactly one of avg_bits or mb, in `scope`."""

    scope: Scope = Scope.ENCODER
    avg_bits: float | None = None
    mb: float | None = None

    def __post_init__(self) -> None:
        if (self.avg_bits is None) == (self.mb is None):
            raise BudgetError("give exactly one of budget.avg_bits and budget.mb")
        value = self.target
        if not math.isfinite(value) or value <= 0:
            raise BudgetError(f"budget.{self.unit}={value} must be a positive number")
        object.__setattr__(self, "scope", Scope(self.scope))

    @classmethod
    def from_args(cls, avg_bits: float | None, mb: float | None, scope: Scope | str,
                  match: str | None = None) -> "Budget | None":
        """None when none is given (no budget); `match`: the exact size in `scope` of that architecture.json."""
        if match is not None:
            if avg_bits is not None or mb is not None:
                raise BudgetError("give one of budget.avg_bits, budget.mb and budget.match")
            try:
                return cls.matching(Architecture.load(match), scope)
            except (ValueError, FileNotFoundError) as e:  # a malformed or missing file: the user's to fix
                raise BudgetError(f"budget.match: {e}") from e
        if avg_bits is None and mb is None:
            return None
        return cls(Scope(scope), avg_bits, mb)

    @classmethod
    def matching(cls, arch: Architecture, scope: Scope | str = Scope.ENCODER) -> "Budget":
        """The exact size of `arch` as a budget (to compare methods at equal size)."""
        return cls(Scope(scope), mb=arch.size_mb(scope))

    @property
    def unit(self) -> str:
        return "avg_bits" if self.avg_bits is not None else "mb"

    @property
    def target(self) -> float:
        return float(self.avg_bits if self.avg_bits is not None else self.mb)

    def __str__(self) -> str:
        return f"{self.target:g} {'bits per weight' if self.unit == 'avg_bits' else 'MiB'} ({self.scope.value})"

    # --- measuring -----------------------------------------------------------------------------
    def measure(self, size: Size) -> torch.Tensor:
        """The budgeted quantity of a (possibly expected, differentiable) size."""
        return size.avg_bits if self.unit == "avg_bits" else size.bytes / MIB

    def of(self, arch: Architecture) -> float:
        return float(self.measure(arch.size(self.scope)))

    def fits(self, arch: Architecture) -> bool:
        return self.of(arch) <= self.target * (1 + TOLERANCE)

    def group_prices(self, arch: Architecture, candidates: dict[str, tuple[int, ...]] | None = None
                     ) -> tuple[dict[str, tuple[list[int], torch.Tensor]], float]:
        """Per site (candidates, [K] price of one group at each) and a constant, so that for any choice of
        bits, sum of the chosen prices + constant == `self.of(...)` (the budget is linear in the groups).
        `candidates` per site default to the bits `arch` uses."""
        size = arch.size(self.scope)
        per_bit = 1.0 / size.weights if self.unit == "avg_bits" else 1.0 / (8 * MIB)
        prices: dict[str, tuple[list[int], torch.Tensor]] = {}
        for name, site in arch:
            cands = sorted(set(candidates[name] if candidates else site.bits))
            if self.scope is Scope.ENCODER and site.kind is not SiteKind.ENCODER:
                prices[name] = (cands, torch.zeros(len(cands), dtype=torch.float64))
                continue
            w, s, b = (t.double() for t in candidate_bits(cands, site.shape, arch.scale_bits))
            bits = w.clone()
            if self.unit == "mb":
                bits += s
            if self.scope is Scope.TOTAL:
                bits += b
            prices[name] = (cands, bits * per_bit)
        constant = FP32_BITS * arch.other_params * per_bit if self.scope is Scope.TOTAL else 0.0
        return prices, constant

    # --- feasibility ---------------------------------------------------------------------------
    def check_reachable(self, template: Architecture, candidates: dict[str, tuple[int, ...]]) -> None:
        """Raise a one-line ValueError when no choice of `candidates` per site can meet this budget, or
        when every choice does (then there is nothing to search)."""
        lo = _uniform_extreme(template, candidates, min)
        hi = _uniform_extreme(template, candidates, max)
        lo_v, hi_v = self.of(lo), self.of(hi)
        unit = "bits per weight" if self.unit == "avg_bits" else "MiB"
        if self.target < lo_v * (1 - TOLERANCE):
            searched = [c for c in candidates.values() if len(c) > 1]
            if any(min(c) > 0 for c in searched) or not searched:
                fix = " or add smaller candidates (0 prunes a group)"
            elif self.scope is Scope.TOTAL:  # every searched group pruned: what is left, the search does not choose
                fix = (", lower space.embedding_bits, or budget the encoder alone (budget.scope=ENCODER): there every "
                       "searched group is pruned, and the rest is the fixed-precision sites and the FP32 parameters")
            else:
                fix = " (there every searched group is pruned)"
            raise BudgetError(
                f"budget {self} is below the smallest size this space reaches ({lo_v:.4g} {unit}, every group at its "
                f"fewest bits); raise the budget{fix}"
            )
        if self.target >= hi_v:
            raise BudgetError(
                f"budget {self} is at or above the largest size this space reaches ({hi_v:.4g} {unit}, every group at "
                f"its most bits): there is nothing to search; lower the budget or drop it"
            )

    # --- the search's penalty ------------------------------------------------------------------
    def penalty(self, expected: Size, kind: Penalty) -> torch.Tensor:
        ratio = self.measure(expected) / self.target
        if kind is Penalty.hinge:
            return torch.relu(ratio - 1)
        if kind is Penalty.log_ratio:
            return torch.log(ratio).pow(2)
        return ratio


def start_probs(bits: list[int], level: float, floor: float) -> torch.Tensor:
    """[K] probabilities over the sorted candidate `bits` with mean near `level`: the mass on the two candidates
    that bracket it (linear interpolation), `floor` on each of the others so that none starts out of reach."""
    p = torch.full((len(bits),), floor, dtype=torch.float64)
    if level <= bits[0]:
        p[0] += 1
    elif level >= bits[-1]:
        p[-1] += 1
    else:
        i = max(k for k, b in enumerate(bits) if b <= level)
        w = (level - bits[i]) / (bits[i + 1] - bits[i])
        p[i] += 1 - w
        p[i + 1] += w
    return p / p.sum()


def start_at_budget(model: nn.Module, budget: Budget, template: Architecture, tau: float, floor: float = 0.01) -> float:
    """Set the logits of every searched weight site so that the search starts at the budget's uniform point:
    every group holds the same probabilities, on the candidates around one common precision `level`, found by
    bisection so that the expected size (linear in the probabilities: `group_prices`) equals the budget. At
    the budget 2 with {0,2,4,8} each group starts at 2 bits with probability 0.94; at 3 halfway between 2 and
    4. The logits are tau * log p, so the first step's softmax at temperature `tau` gives p. Returns `level`."""
    cands = site_candidates(model)
    prices, constant = budget.group_prices(template, cands)

    def measure(level: float) -> float:
        total = constant
        for name, site in template:
            bits, price = prices[name]
            total += len(site.bits) * float(start_probs(bits, level, floor) @ price)
        return total

    lo = min(min(c) for c in cands.values())
    hi = max(max(c) for c in cands.values())
    for _ in range(60):  # measure is non-decreasing in level
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if measure(mid) < budget.target else (lo, mid)
    level = lo
    with torch.no_grad():
        for _, site in sites(model):
            wq = site.wq
            if not wq.searchable:
                continue
            bits = sorted(wq.cands.bits)
            p = start_probs(bits, level, floor)
            row = torch.stack([p[bits.index(b)] for b in wq.cands.bits]).log() * tau  # [K], in wq's candidate order
            wq.alpha.copy_(row.to(wq.alpha).expand_as(wq.alpha))
    return level


def check_bitops_target(target: float | None, template: Architecture, candidates: dict[str, tuple[int, ...]],
                        a_bits: Sequence[int]) -> None:
    """`search.bitops_target` (GBOPs per token) against the bit-operations this space can reach: below the fewest
    (every group at its fewest weight bits, every quantized input at the fewest of `a_bits`) is a one-line error,
    since the penalty could never be met; at or above the most it never acts, which is logged as a warning."""
    if target is None:
        return

    def extreme(pick) -> float:
        arch = _uniform_extreme(template, candidates, pick)
        a = pick(a_bits)
        sites = tuple((name, site if site.a_bits is None else dataclasses.replace(site, a_bits=a)) for name, site in arch)
        return dataclasses.replace(arch, sites=sites).bitops() / 1e9

    lo, hi = extreme(min), extreme(max)
    if target < lo * (1 - TOLERANCE):
        raise BudgetError(f"search.bitops_target={target:g} GBOPs per token is below the fewest this space reaches "
                          f"({lo:.4g}, every group at its fewest weight and activation bits); raise it, or add "
                          f"smaller candidates to space.w_bits or space.a_bits")
    if target >= hi:
        log.warning("search.bitops_target=%g GBOPs per token is at or above the most this space reaches (%.4g, every "
                    "group at its most bits): the bit-operations penalty never acts", target, hi)


def site_candidates(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Candidate bits of every site of a supernet, as `check_reachable` and `group_prices` take them."""
    return {name: site.wq.cands.bits for name, site in sites(model)}


def _uniform_extreme(template: Architecture, candidates: dict[str, tuple[int, ...]], pick) -> Architecture:
    sites = []
    for name, site in template:
        bits = pick(candidates[name])
        sites.append((name, dataclasses.replace(site, bits=(bits,) * len(site.bits))))
    return dataclasses.replace(template, sites=tuple(sites))


def uniform(template: Architecture, bits: int, kinds: tuple[SiteKind, ...] = (SiteKind.ENCODER,)) -> Architecture:
    """`template` with every group of the given kinds of site at `bits` (the uniform-precision baseline)."""
    sites: list[tuple[str, SiteArch]] = []
    for name, site in template:
        new = dataclasses.replace(site, bits=(bits,) * len(site.bits)) if site.kind in kinds else site
        sites.append((name, new))
    return dataclasses.replace(template, sites=tuple(sites))
