"""Derivation: a searched supernet's logits -> one Architecture within the budget.

DARTS (arXiv:1806.09055) keeps the strongest candidate of every edge; here every group keeps its argmax
bits. If that exceeds the budget, it is repaired greedily: each step downgrades, to its next smaller
candidate, the group whose loss in probability per unit of size saved is smallest, until the exact size
(supernet.cost, through `Budget`) fits. If it is under the budget (`fill`), the leftover is spent the same
way upward: the group whose loss in probability per unit of size added is smallest moves to its next
larger candidate while the result still fits, so the model lands on the budget instead of far below it
(argmax of nearly tied logits would otherwise pick the same candidate everywhere). The report says how
far each phase had to go, and how decided the search was: the median over groups of the top candidate's
probability, and the share of groups whose top candidate holds at least `DECIDED` of it. A search that has
not decided (median top probability under `UNDECIDED`) leaves the architecture to the repair and fill
heuristics, not to what the search learned; that gets a warning naming the settings that sharpen it.

`exact=True` (search.derivation=exact) replaces the greedy repair with the most probable architecture within the
budget: each group's candidates are valued at -log p and the multiple-choice knapsack of search/knapsack.py picks
the least total, i.e. the largest product of the chosen candidates' probabilities (the factorised distribution's
mode under the budget). The greedy repair moves one candidate at a time, so a group whose probability is split
between its largest and its smallest candidate (say 0.5 at 4 bits, 0.4 at 1 bit) pays for the unlikely 3 and 2
bits on the way down and is passed over; the knapsack moves it straight to 1 bit. The fill phase (argmax under the
budget) is the same in both.
"""
from __future__ import annotations

import dataclasses
import heapq
import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from supernet import Architecture, Scope, SiteArch, sites
from supernet.cost import FP32_BITS

from .budget import Budget, start_probs
from .knapsack import Knapsack

log = logging.getLogger(__name__)

DECIDED = 0.9  # a group's top candidate holding this much probability counts as decided
UNDECIDED = 0.5  # below this median top probability the search is reported as undecided
MIN_PROB = 1e-12  # probabilities are floored here before the exact derivation takes their log
KNAPSACK_TIME_LIMIT = 10.0  # seconds for the exact derivation's integer program (search/knapsack.py)


@dataclass
class DeriveReport:
    argmax: float | None  # the budgeted quantity of the plain argmax architecture
    final: float | None
    target: float | None
    unit: str | None
    # one-candidate steps down and up (greedy takes one per move; a group moved from 4 to 1 bits counts 3 steps)
    downgraded_groups: int = 0
    upgraded_groups: int = 0
    moved_groups: int = 0  # groups whose final bits differ from their argmax's
    probability_lost: float = 0.0  # sum over moved groups of p(argmax) - p(final choice)
    median_top_prob: float | None = None  # over searched groups, the median probability of their top candidate
    decided_share: float | None = None  # share of searched groups whose top candidate holds >= DECIDED
    exact: bool = False  # the repair was the knapsack's most probable architecture, not the greedy moves
    site: bool = False  # each site at the two candidates around its expected bits (search.derivation=site)
    optimality_gap: float | None = None  # exact only: the knapsack's proven relative gap in -log probability

    def as_dict(self) -> dict:
        return asdict(self)


def candidate_probs(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.Tensor]]:
    """Per site (candidate bits, [G, K] probabilities without sampling noise)."""
    out = {}
    for name, site in sites(model):
        with torch.no_grad():
            out[name] = (site.wq.cands.bits, site.wq.mean_probs().detach().double().cpu())
    return out


def activation_probs(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.Tensor]]:
    """Per searched activation quantizer, under the name of the first site that reads it (Q, K and V share one):
    (candidate bits, [1, K] probabilities without sampling noise)."""
    out, seen = {}, set()
    for name, site in sites(model):
        aq = getattr(site, "aq", None)
        if aq is None or not aq.searchable or id(aq) in seen:
            continue
        seen.add(id(aq))
        with torch.no_grad():
            out[name] = (aq.cands.bits, aq.mean_probs().detach().double().cpu())
    return out


def decidedness(probs: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> tuple[float | None, float | None]:
    """(median top probability, share of groups at >= DECIDED) over the groups with several candidates."""
    tops = [p.max(1).values for bits, p in probs.values() if len(bits) > 1]
    if not tops:
        return None, None
    top = torch.cat(tops)
    return float(top.median()), float((top >= DECIDED).double().mean())


def derive(model: nn.Module, budget: Budget | None, fill: bool = True,
           scale_bits: int = FP32_BITS, exact: bool = False, site: bool = False) -> tuple[Architecture, DeriveReport]:
    """Argmax architecture of `model`, repaired down to `budget` (greedily, or with `exact` the most probable
    architecture that fits) and (with `fill`) filled up to it; sizes count each group's step at `scale_bits`
    (space.scale_bits). With `site`, each site's groups take the two precisions around the site's expected bits
    instead (`site_choice`)."""
    return derive_from(Architecture.from_supernet(model, scale_bits), candidate_probs(model), budget, fill, exact, site)


def at_argmax(template: Architecture, probs: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> Architecture:
    """`template` with every group at its most probable candidate under `probs` (as alphas.json holds them)."""
    out = []
    for name, site in template:
        if name not in probs:
            raise ValueError(f"no candidate probabilities for site {name!r}; are they from a search of this model?")
        bits, p = probs[name]
        if p.shape != (len(site.bits), len(bits)):
            raise ValueError(f"{name}: probabilities of shape {tuple(p.shape)}, and the site has {len(site.bits)} groups "
                             f"and {len(bits)} candidates")
        out.append((name, _with_bits(site, [bits[i] for i in p.argmax(1).tolist()])))
    return dataclasses.replace(template, sites=tuple(out))


def derive_from(arch: Architecture, probs: dict[str, tuple[tuple[int, ...], torch.Tensor]], budget: Budget | None,
                fill: bool = True, exact: bool = False, site: bool = False) -> tuple[Architecture, DeriveReport]:
    """`derive` on an argmax architecture `arch` and its groups' candidate probabilities `probs`."""
    median, share = decidedness(probs)
    if median is not None and median < UNDECIDED:
        log.warning("the search has not decided: the median group's top candidate holds only %.2f of the probability "
                    "(%.0f%% of groups at >= %.1f), so repair and fill choose most groups; search longer "
                    "(search.epochs), with a larger search.arch_lr or a lower search.tau_end", median, 100 * share, DECIDED)
    if budget is None and not site:
        return arch, DeriveReport(None, None, None, None, median_top_prob=median, decided_share=share)
    start = None if budget is None else budget.of(arch)
    report = DeriveReport(start, start, None if budget is None else budget.target, None if budget is None else budget.unit,
                          median_top_prob=median, decided_share=share, exact=exact, site=site)
    if budget is not None and budget.fits(arch) and not fill and not site:
        return arch, report
    if budget is None:  # the site rule at the search's own expected size: no repair, no fill
        budget = Budget(avg_bits=arch.avg_bits(Scope.ENCODER))
        fill, target = False, math.inf
    else:
        target = budget.target * (1 + 1e-9)

    prices, constant = budget.group_prices(arch, {n: c for n, (c, _) in probs.items()})
    choice: dict[str, list[int]] = {}  # site -> per group, index into the sorted candidates
    columns: dict[str, list[int]] = {}  # site -> sorted candidate position -> column of its probabilities
    total = constant
    for name, now in arch:
        cands, _ = probs[name]
        sorted_cands, price = prices[name]
        columns[name] = [cands.index(b) for b in sorted_cands]
        choice[name] = [sorted_cands.index(b) for b in now.bits]
        total += float(price[choice[name]].sum())

    def record(name: str, g: int, j: int) -> None:
        """Move group g of site `name` to sorted candidate j, counting the move and the probability it costs."""
        i, p, col = choice[name][g], probs[name][1], columns[name]
        report.probability_lost += float(p[g, col[i]] - p[g, col[j]])
        report.downgraded_groups += max(i - j, 0)
        report.upgraded_groups += max(j - i, 0)
        choice[name][g] = j

    def move(direction: int) -> None:
        """Greedy moves by one candidate in `direction`, cheapest probability per unit of price first."""
        nonlocal total
        heap: list[tuple[float, float, str, int]] = []
        for name in choice:
            for g in range(len(choice[name])):
                _offer(heap, name, g, choice[name][g], direction, probs[name][1], prices[name][1], columns[name])
        while heap and (total > target if direction < 0 else True):
            _, _, name, g = heapq.heappop(heap)
            i = choice[name][g]
            j = i + direction
            price, p, col = prices[name][1], probs[name][1], columns[name]
            delta = float(price[j] - price[i])
            if direction > 0 and total + delta > target:
                continue  # does not fit; a cheaper move elsewhere still may
            total += delta
            record(name, g, j)
            _offer(heap, name, g, j, direction, p, price, col)

    if site:
        new_choice, total = site_choice(choice, columns, probs, prices, constant, target, fill)
        for name, new in new_choice.items():
            for g, j in enumerate(new):
                if j != choice[name][g]:
                    record(name, g, j)
    elif total > target and exact:
        sack = _probability_knapsack(choice, columns, probs, prices, constant)
        if sack.bounds()[0] > target:
            raise ValueError(f"cannot fit budget {budget}: every group is already at its fewest bits")
        best = sack.allocate(budget.target, KNAPSACK_TIME_LIMIT)
        report.optimality_gap = best.gap
        for name, new in zip(sack.names, best.choice):
            for g, j in enumerate(new.tolist()):
                if j != choice[name][g]:
                    record(name, g, j)
    elif total > target:
        move(-1)
        if total > target:
            raise ValueError(f"cannot fit budget {budget}: every group is already at its fewest bits")
    elif fill:
        move(+1)

    result = dataclasses.replace(
        arch, sites=tuple((name, _with_bits(s, [prices[name][0][i] for i in choice[name]])) for name, s in arch))
    report.final = budget.of(result)
    report.moved_groups = sum(a != b for (_, s0), (_, s1) in zip(arch, result) for a, b in zip(s0.bits, s1.bits))
    if report.target is None:
        log.info("derive (site): %d groups moved from the argmax, %.4g bits per weight (encoder)", report.moved_groups,
                 report.final)
        report.final = None
        return result, report
    if not budget.fits(result):  # the linear prices and the cost model disagree: a bug, not bad input
        raise AssertionError(f"derivation reached {report.final} against {budget.target}")
    log.info("derive%s: argmax %.4g -> %.4g %s (budget %.4g): %d groups moved, %d candidate steps down, %d up, "
             "probability lost %.3f%s", " (exact)" if exact else " (site)" if site else "", start, report.final,
             budget.unit, budget.target,
             report.moved_groups, report.downgraded_groups, report.upgraded_groups, report.probability_lost,
             "" if report.optimality_gap is None else f", optimality gap {report.optimality_gap:.2g}")
    return result, report


def site_choice(choice: dict[str, list[int]], columns: dict[str, list[int]], probs, prices, constant: float,
                target: float, fill: bool) -> tuple[dict[str, list[int]], float]:
    """search.derivation=site: per site, the groups take the two adjacent candidates around the site's expected bits
    (the mean over its groups of each group's expected bits), as many at the upper one as that mean asks; the groups
    with the higher expected bits take the upper one. A site keeps the precision the search gave it, and within it
    the groups differ by at most one candidate: quantization error grows faster than linearly as bits fall, so at
    one mean a spread of precisions costs more than two adjacent ones, unless the groups really differ in
    sensitivity, which a short search tells apart little better than chance (BENCHMARKS.md, "Are the search's choices
    signal or noise?"). Each site's position on its ladder of candidates, counted in groups, is then moved a group at
    a time (the site furthest above its share first) until the exact size fits `target`, and (with `fill`) back up
    while it still does. Returns the choice (sorted candidate index per group) and its total price."""
    ladder: dict[str, tuple[int, int, torch.Tensor, torch.Tensor]] = {}  # site -> (groups, candidates, order, price)
    want: dict[str, float] = {}
    pos: dict[str, int] = {}
    total = constant
    fixed: dict[str, list[int]] = {}
    for name, now in choice.items():
        cands, price = prices[name]
        n, k = len(now), len(cands)
        if k == 1:
            fixed[name] = list(now)
            total += float(price[now].sum())
            continue
        q = probs[name][1][:, columns[name]]  # [G, K] in sorted candidate order
        expected = q @ torch.tensor(cands, dtype=q.dtype)  # [G] each group's expected bits
        # the mean's place among the candidates: between the two that bracket it, as the search's at-budget start
        bracket = start_probs(list(cands), float(expected.mean()), 0.0)
        want[name] = n * float(bracket @ torch.arange(k, dtype=bracket.dtype))
        pos[name] = int(round(want[name]))
        order = torch.argsort(-expected, stable=True)
        ladder[name] = (n, k, order, price)
        total += _site_price(pos[name], n, price)

    def step(name: str, d: int) -> float:
        n, _, _, price = ladder[name]
        return _site_price(pos[name] + d, n, price) - _site_price(pos[name], n, price)

    while total > target:
        movable = [nm for nm in pos if pos[nm] > 0 and step(nm, -1) < 0]
        if not movable:
            raise ValueError("cannot fit the budget: every group is already at its fewest bits")
        name = max(movable, key=lambda nm: ((pos[nm] - want[nm]) / ladder[nm][0], nm))
        total += step(name, -1)
        pos[name] -= 1
    while fill:
        room = [nm for nm in pos if pos[nm] < ladder[nm][0] * (ladder[nm][1] - 1) and total + step(nm, +1) <= target]
        if not room:
            break
        name = min(room, key=lambda nm: ((pos[nm] - want[nm]) / ladder[nm][0], nm))
        total += step(name, +1)
        pos[name] += 1
    out = dict(fixed)
    for name, (n, k, order, _) in ladder.items():
        low, upper = min(pos[name] // n, k - 1), pos[name] % n
        bits = [low] * n
        for g in order[:upper].tolist():
            bits[g] = low + 1
        out[name] = bits
    return {name: out[name] for name in choice}, total


def _site_price(t: int, n: int, price: torch.Tensor) -> float:
    """Price of a site of `n` groups at ladder position `t`: t // n candidates up for all, one more for t % n."""
    low, upper = t // n, t % n
    if low >= len(price) - 1:
        return float(n * price[-1])
    return float((n - upper) * price[low] + upper * price[low + 1])


def _probability_knapsack(choice: dict[str, list[int]], columns: dict[str, list[int]], probs, prices,
                          constant: float) -> Knapsack:
    """The knapsack whose least total value within a budget is the most probable architecture: every candidate
    valued at -log p, so the least sum is the largest product of the chosen candidates' probabilities."""
    names = tuple(choice)
    return Knapsack(
        names=names, bits=tuple(tuple(prices[n][0]) for n in names),
        values=tuple(-np.log(np.clip(probs[n][1][:, columns[n]].numpy(), MIN_PROB, None)) for n in names),
        prices=tuple(prices[n][1].numpy() for n in names), constant=constant)


def _offer(heap, name: str, g: int, i: int, direction: int, p: torch.Tensor, price: torch.Tensor, col: list[int]) -> None:
    """Offer group g's next move (sorted candidate i -> i + direction), keyed by probability lost per price moved."""
    j = i + direction
    if not 0 <= j < len(col):
        return
    moved = abs(float(price[j] - price[i]))
    if moved <= 0:
        return
    lost = float(p[g, col[i]] - p[g, col[j]])
    heapq.heappush(heap, (lost / moved, -moved if direction < 0 else moved, name, g))


def _with_bits(site: SiteArch, bits: list[int]) -> SiteArch:
    return dataclasses.replace(site, bits=tuple(int(b) for b in bits))
