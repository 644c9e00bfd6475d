"""How a weight matrix is cut into sub-groups (Q-BERT, arXiv:1909.05840, group-wise quantization).

Groups run along a site's output features: the rows of a Linear weight [out, in], the columns of an
embedding table [vocab, dim]. Each group shares one row of architecture logits and one step size per
candidate. For Q/K/V, whose rows are laid out head after head, a group count that is a multiple or a
divisor of the head count keeps every group inside one head (or whole heads inside a group).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

PER_ROW = -1
_warned: set[tuple[int, int, int]] = set()


def _divisors(n: int, limit: int = 8) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0][:limit]


@dataclass(frozen=True)
class Grouping:
    """`n_groups` contiguous groups of `features // n_groups` output features each."""

    features: int
    n_groups: int
    heads: int | None = None

    @property
    def size(self) -> int:
        """Output features per group."""
        return self.features // self.n_groups

    @property
    def head_aligned(self) -> bool:
        if not self.heads:
            return True
        return self.n_groups % self.heads == 0 or self.heads % self.n_groups == 0

    def group_of_feature(self) -> torch.Tensor:
        """[features] -> index of the group each output feature belongs to."""
        return torch.arange(self.features) // self.size


def make_grouping(site: str, features: int, n_groups: int, heads: int | None = None) -> Grouping:
    """Validate a group count for a site with `features` output features; -1 means one per feature."""
    g = features if n_groups == PER_ROW else n_groups
    if g < 1 or features % g != 0:
        raise ValueError(
            f"{site}: {n_groups} groups do not divide its {features} output features; "
            f"use a divisor of {features} (e.g. {_divisors(features)}, or {features}) or -1 for one group per row"
        )
    grouping = Grouping(features, g, heads)
    if not grouping.head_aligned and (features, g, heads) not in _warned:
        _warned.add((features, g, heads))
        log.warning(
            "%s (and sites like it): %d groups do not nest in %d heads (groups of %d rows, heads of %d); groups may span two heads",
            site, g, heads, grouping.size, features // heads,
        )
    return grouping
