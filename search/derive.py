"""Derivation: a searched supernet's logits -> one Architecture within the budget.

DARTS (arXiv:1806.09055) keeps the strongest candidate of every edge; here every group keeps its argmax
bits. If that exceeds the budget, it is repaired greedily: each step downgrades, to its next smaller
candidate, the group whose loss in probability per unit of size saved is smallest, until the exact size
(supernet.cost, through `Budget`) fits. The report says how far the repair had to go.
"""
from __future__ import annotations

import dataclasses
import heapq
import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

from supernet import Architecture, SiteArch, sites

from .budget import Budget

log = logging.getLogger(__name__)


@dataclass
class DeriveReport:
    argmax: float | None  # the budgeted quantity of the plain argmax architecture
    final: float | None
    target: float | None
    unit: str | None
    downgraded_groups: int = 0
    probability_lost: float = 0.0  # sum over downgraded groups of p(argmax) - p(final choice)

    def as_dict(self) -> dict:
        return asdict(self)


def candidate_probs(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.Tensor]]:
    """Per site (candidate bits, [G, K] probabilities without sampling noise)."""
    out = {}
    for name, site in sites(model):
        with torch.no_grad():
            out[name] = (site.wq.cands.bits, site.wq.mean_probs().detach().double().cpu())
    return out


def derive(model: nn.Module, budget: Budget | None) -> tuple[Architecture, DeriveReport]:
    """Argmax architecture of `model`, repaired to fit `budget` (when given)."""
    arch = Architecture.from_supernet(model)
    if budget is None:
        return arch, DeriveReport(None, None, None, None)
    start = budget.of(arch)
    report = DeriveReport(start, start, budget.target, budget.unit)
    if budget.fits(arch):
        return arch, report

    probs = candidate_probs(model)
    prices, constant = budget.group_prices(arch, {n: c for n, (c, _) in probs.items()})
    choice = {}  # site -> list of candidate indices (into sorted candidates)
    total = constant
    heap: list[tuple[float, float, str, int]] = []
    order = {}
    for name, site in arch:
        cands, p = probs[name]
        sorted_cands, price = prices[name]
        order[name] = [cands.index(b) for b in sorted_cands]  # sorted position -> column of p
        idx = [sorted_cands.index(b) for b in site.bits]
        choice[name] = idx
        total += float(price[idx].sum())
        for g, i in enumerate(idx):
            _push(heap, name, g, i, p, price, order[name])

    target = budget.target
    while total > target * (1 + 1e-9):
        if not heap:
            raise ValueError(f"cannot fit budget {budget}: every group is already at its fewest bits")
        _, _, name, g = heapq.heappop(heap)
        _, p = probs[name]
        _, price = prices[name]
        i = choice[name][g]
        j = i - 1
        total -= float(price[i] - price[j])
        report.probability_lost += float(p[g, order[name][i]] - p[g, order[name][j]])
        report.downgraded_groups += 1
        choice[name][g] = j
        _push(heap, name, g, j, p, price, order[name])

    repaired = Architecture(
        tuple((name, _with_bits(site, [prices[name][0][i] for i in choice[name]])) for name, site in arch),
        arch.other_params, arch.scale_bits,
    )
    report.final = budget.of(repaired)
    if not budget.fits(repaired):  # the linear prices and the cost model disagree: a bug, not bad input
        raise AssertionError(f"repair reached {report.final} against {target}")
    log.info("derive: argmax %.4g -> %.4g %s (budget %.4g): %d groups downgraded, probability lost %.3f",
             start, report.final, budget.unit, target, report.downgraded_groups, report.probability_lost)
    return repaired, report


def _push(heap, name: str, g: int, i: int, p: torch.Tensor, price: torch.Tensor, order: list[int]) -> None:
    """Offer group g's next downgrade (sorted candidate i -> i - 1), keyed by probability lost per price saved."""
    if i == 0:
        return
    saved = float(price[i] - price[i - 1])
    lost = float(p[g, order[i]] - p[g, order[i - 1]])
    if saved <= 0:
        return
    heapq.heappush(heap, (lost / saved, -saved, name, g))


def _with_bits(site: SiteArch, bits: list[int]) -> SiteArch:
    return dataclasses.replace(site, bits=tuple(int(b) for b in bits))
