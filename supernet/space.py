"""The search space: which candidates every kind of site offers, and how weights are grouped.

A candidate list with one entry fixes that precision; two or more make it searchable. This is the
only configuration the library takes (the app builds it from the hydra `space` group).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Mapping, Optional, Sequence

from .quantizers import MIDRISE_BITS, WEIGHT_GRIDS, CandidateSet, InitRule, QuantMode, check_bits, is_float_bits


class SiteKind(Enum):
    """Where a site sits; decides its candidates and the size scope it counts in."""

    ENCODER = "encoder"  # Q/K/V, attention output, FFN in/out of an encoder layer
    EMBEDDING = "embedding"  # word / position / token-type embeddings
    HEAD = "head"  # pooler and task head


class Relaxation(Enum):
    """How architecture logits become candidate probabilities during search."""

    SOFTMAX = "softmax"  # softmax(alpha / tau)
    GUMBEL = "gumbel"  # Gumbel-softmax sample, soft
    GUMBEL_HARD = "gumbel_hard"  # Gumbel-softmax sample, one-hot forward, soft backward


def _bits_list(name: str, bits: List[int], allow_zero: bool) -> tuple[int, ...]:
    if isinstance(bits, (str, bytes)) or not isinstance(bits, Sequence):
        raise ValueError(f"space.{name}={bits!r} is not a list of bit-widths; write e.g. [{bits}]")
    if not bits:
        raise ValueError(f"space.{name} is empty; give at least one bit-width, e.g. [8]")
    for b in bits:
        try:
            check_bits(b)
        except ValueError as e:
            raise ValueError(f"space.{name}={list(bits)}: {e}") from None
    if not allow_zero and 0 in bits:
        raise ValueError(f"space.{name} cannot contain 0: activations cannot be pruned")
    if len(set(bits)) != len(bits):
        raise ValueError(f"space.{name} repeats a bit-width: {list(bits)}")
    if list(bits) == [0]:
        raise ValueError(f"space.{name}=[0] prunes every group it covers; add a bit-width, e.g. [0, 2, 4, 8]")
    return tuple(sorted(bits))


@dataclass
class SearchSpace:
    """Candidates per kind of site, grouping and quantizer settings.

    w_bits: encoder Linear weights (Q/K/V, attention output, FFN in/out); 0 prunes a group, 16/32 is float,
        1 is binary (the mid-rise grid only).
    w_grid: the integer grid of every weight (encoder, embeddings, head): SYMMETRIC, codes c in
        [-2^(b-1), 2^(b-1) - 1] at c * s, or MIDRISE, the same codes at (c + 1/2) * s (2 bits: {-3/2, -1/2,
        1/2, 3/2} * s: 15% less squared error than the symmetric grid on MiniLM-L6's encoder weights; 11% more
        at 4 bits, having no level at zero).
    groups: groups per matrix along output features (-1: one group per row).
    a_bits: input activations of every quantized Linear (32 = not quantized).
    embedding_bits / embedding_groups: word, position and token-type embeddings ([32] leaves them FP).
    head_bits: pooler and task head ([32] leaves them FP, the default).
    """

    w_bits: List[int] = field(default_factory=lambda: [0, 2, 4, 8])
    groups: int = 128
    a_bits: List[int] = field(default_factory=lambda: [8])
    a_mode: QuantMode = QuantMode.SYMMETRIC
    w_grid: QuantMode = QuantMode.SYMMETRIC
    embedding_bits: List[int] = field(default_factory=lambda: [8])
    embedding_groups: Optional[int] = None
    head_bits: List[int] = field(default_factory=lambda: [32])
    init: InitRule = InitRule.MSE
    scale_bits: int = 32  # storage cost of one step size (fp32; 16 for fp16 scales)

    def __post_init__(self) -> None:
        _bits_list("w_bits", self.w_bits, allow_zero=True)
        _bits_list("a_bits", self.a_bits, allow_zero=False)
        _bits_list("embedding_bits", self.embedding_bits, allow_zero=True)
        _bits_list("head_bits", self.head_bits, allow_zero=True)
        for name in ("groups", "embedding_groups"):
            g = getattr(self, name)
            if g is not None and (isinstance(g, bool) or not isinstance(g, int) or (g < 1 and g != -1)):
                raise ValueError(f"space.{name}={g!r} is invalid; use a positive number of groups or -1 for one per row")
        if not is_float_bits(self.scale_bits):
            raise ValueError(f"space.scale_bits={self.scale_bits} is invalid; scales are stored as 16 or 32 bits")
        self.a_mode = QuantMode(self.a_mode)
        self.w_grid = QuantMode(self.w_grid)
        self.init = InitRule(self.init)
        if self.w_grid not in WEIGHT_GRIDS:
            raise ValueError(f"space.w_grid={self.w_grid.name} is not a weight grid; use "
                             f"{' or '.join(m.name for m in WEIGHT_GRIDS)}")
        if self.a_mode is QuantMode.MIDRISE:
            raise ValueError("space.a_mode=MIDRISE is a weight grid; activations use SYMMETRIC, UNSIGNED or ASYMMETRIC "
                             "(space.w_grid=MIDRISE sets it for the weights)")
        if MIDRISE_BITS in self.a_bits:
            raise ValueError(f"space.a_bits={list(self.a_bits)} has {MIDRISE_BITS} bit; activations need 2 or more")
        for name in ("w_bits", "embedding_bits", "head_bits"):
            if MIDRISE_BITS in getattr(self, name) and self.w_grid is not QuantMode.MIDRISE:
                raise ValueError(f"space.{name} has a {MIDRISE_BITS}-bit candidate, which needs the mid-rise grid; "
                                 f"add space.w_grid=MIDRISE or drop the {MIDRISE_BITS}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (enums by value)."""
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "space") -> "SearchSpace":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source} has unknown keys {unknown}; it was written by another bert-mpq version")
        return cls(**d)

    def weight_candidates(self) -> CandidateSet:
        return CandidateSet(_bits_list("w_bits", self.w_bits, True), self.w_grid)

    def activation_candidates(self) -> CandidateSet:
        return CandidateSet(_bits_list("a_bits", self.a_bits, False), self.a_mode)

    def embedding_candidates(self) -> CandidateSet:
        return CandidateSet(_bits_list("embedding_bits", self.embedding_bits, True), self.w_grid)

    def head_candidates(self) -> CandidateSet:
        return CandidateSet(_bits_list("head_bits", self.head_bits, True), self.w_grid)

    def embedding_group_count(self) -> int:
        return self.groups if self.embedding_groups is None else self.embedding_groups
