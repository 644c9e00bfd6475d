"""Architecture: the one hand-off type between choosing precisions and using them.

A frozen record of, for every site (keyed by its Hugging Face module name), the bits of each group
(0 = pruned), the group's parameter count and the site's activation bits. The DNAS derivation and the
HAWQ-V2 baseline produce it; QAT, evaluation and export consume it. Sizes come from `supernet.cost`
with one-hot probabilities, i.e. the same function that prices the supernet during search.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .cost import FP32_BITS, MIB, CostEntry, Scope, SiteShape, Size, bitops, size
from .files import follow_umask
from .mixed import sites
from .params import other_fp32_params
from .quantizers import MIDRISE_BITS, WEIGHT_GRIDS, QuantMode, check_bits, is_float_bits
from .space import SiteKind

FORMAT = "bert-mpq.architecture"
VERSION = 1


@dataclass(frozen=True)
class SiteArch:
    """The discrete precision of one site."""

    kind: SiteKind
    bits: tuple[int, ...]  # per group, 0 = pruned
    group_numel: int  # weights per group
    rows_per_group: int  # output features per group
    in_features: int  # MACs per output feature per token (0 for embeddings)
    bias: bool
    a_bits: int | None = None  # input activation bits (None: not quantized / no input)

    def __post_init__(self) -> None:
        if not self.bits:
            raise ValueError("a site needs at least one group")
        for b in self.bits:
            check_bits(b)
        if self.group_numel < 1 or self.rows_per_group < 1:
            raise ValueError(f"group_numel and rows_per_group must be positive, got {self.group_numel}, {self.rows_per_group}")
        if self.a_bits is not None:
            check_bits(self.a_bits)

    @property
    def shape(self) -> SiteShape:
        return SiteShape(self.kind, len(self.bits), self.group_numel, self.rows_per_group, self.in_features, self.bias)

    def entry(self) -> CostEntry:
        cands = sorted(set(self.bits))
        idx = torch.tensor([cands.index(b) for b in self.bits])
        probs = torch.nn.functional.one_hot(idx, len(cands)).double()  # [G] -> [G, K]; float64: exact sizes
        return CostEntry(self.shape, cands, probs, float(self.a_bits or FP32_BITS))


def _whole(value: Any, field: str) -> int:
    """A whole number from a hand-written file: 4 or 4.0, not 2.7 (which int() would silently make 2) or true."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value != int(value):
        raise ValueError(f"{field} {value!r} is not a whole number")
    return int(value)


def _flag(value: Any, field: str) -> bool:
    """true or false; the string "false" is not false (bool() would make it true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{field} {value!r} is not true or false")
    return value


@dataclass(frozen=True)
class Architecture:
    """Bits per group for every site, plus the count of parameters kept in FP32 outside the sites."""

    sites: tuple[tuple[str, SiteArch], ...]
    other_params: int
    scale_bits: int = FP32_BITS
    # the integer grid of its weights (space.w_grid): the same bits are other levels on another grid.
    # None: not recorded (a hand-written file, or one from before the field); the space in use decides.
    w_grid: QuantMode | None = None

    def __post_init__(self) -> None:
        names = [n for n, _ in self.sites]
        if len(set(names)) != len(names):
            raise ValueError("an architecture names a site twice")
        if not names:
            raise ValueError("an architecture needs at least one site")
        if not is_float_bits(self.scale_bits):
            raise ValueError(f"scale_bits {self.scale_bits!r} is not a float width a step is stored in; use 16 or 32")
        if isinstance(self.other_params, bool) or not isinstance(self.other_params, int) or self.other_params < 0:
            raise ValueError(f"other_fp32_params {self.other_params!r} is not a count of parameters")
        if self.w_grid is not None:  # a member, or its value string ("midrise", as architecture.json has it)
            grid = next((g for g in WEIGHT_GRIDS if self.w_grid in (g, g.value)), None)
            if grid is None:
                raise ValueError(f"w_grid {getattr(self.w_grid, 'value', self.w_grid)!r} is not a weight grid; use "
                                 f"one of {[g.value for g in WEIGHT_GRIDS]} or leave it out")
            object.__setattr__(self, "w_grid", grid)
            one_bit = next((n for n, site in self.sites if MIDRISE_BITS in site.bits), None)
            if one_bit is not None and grid is not QuantMode.MIDRISE:
                raise ValueError(f"{one_bit} has {MIDRISE_BITS}-bit groups, which only the mid-rise grid has, but the "
                                 f"architecture is on the {grid.value} grid; set \"w_grid\": \"{QuantMode.MIDRISE.value}\" "
                                 f"or give those groups 2 bits or more")

    # --- lookup --------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.sites]

    def site(self, name: str) -> SiteArch:
        for n, s in self.sites:
            if n == name:
                return s
        raise KeyError(f"no site {name!r} in this architecture")

    def __iter__(self) -> Iterator[tuple[str, SiteArch]]:
        return iter(self.sites)

    # --- size ----------------------------------------------------------------------------------
    def size(self, scope: Scope | str = Scope.ENCODER) -> Size:
        return size([s.entry() for _, s in self.sites], self.other_params, Scope(scope), self.scale_bits)

    def size_bytes(self, scope: Scope | str = Scope.ENCODER) -> float:
        """Exact bytes of `scope` (steps included; see supernet.cost)."""
        return float(self.size(scope).bytes)

    def size_mb(self, scope: Scope | str = Scope.ENCODER) -> float:
        return self.size_bytes(scope) / MIB

    def avg_bits(self, scope: Scope | str = Scope.ENCODER) -> float:
        """Average bits per weight in `scope`, step overhead excluded (the papers' convention)."""
        return float(self.size(scope).avg_bits)

    def fp32_bytes(self, scope: Scope | str = Scope.ENCODER) -> float:
        return self.size(scope).weights * FP32_BITS / 8

    def compression_ratio(self, scope: Scope | str = Scope.ENCODER) -> float:
        """FP32 bytes / exact bytes of `scope`; inf when everything in it is pruned."""
        size_bytes = self.size_bytes(scope)
        return self.fp32_bytes(scope) / size_bytes if size_bytes > 0 else float("inf")

    def bitops(self) -> float:
        """Bit-operations per token (see supernet.cost.bitops)."""
        return float(bitops([s.entry() for _, s in self.sites]))

    def n_groups(self) -> int:
        return sum(len(s.bits) for _, s in self.sites)

    def pruned_groups(self) -> int:
        return sum(s.bits.count(0) for _, s in self.sites)

    def bits_histogram(self, scope: Scope | str = Scope.ENCODER) -> dict[int, int]:
        """Number of weights at each bit-width in `scope`."""
        hist: Counter[int] = Counter()
        for _, s in self.sites:
            if Scope(scope) is Scope.ENCODER and s.kind is not SiteKind.ENCODER:
                continue
            for b in s.bits:
                hist[b] += s.group_numel
        return dict(sorted(hist.items()))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for scope in Scope:
            out[f"{scope.value}_bytes"] = self.size_bytes(scope)  # exact (bits / 8): MiB below are rounded
            out[f"{scope.value}_mb"] = round(self.size_mb(scope), 4)
            out[f"{scope.value}_avg_bits"] = round(self.avg_bits(scope), 4)
            ratio = self.compression_ratio(scope)
            out[f"{scope.value}_compression"] = round(ratio, 3) if ratio != float("inf") else None
            out[f"{scope.value}_fp32_mb"] = round(self.fp32_bytes(scope) / MIB, 4)
        out["groups"] = self.n_groups()
        out["pruned_groups"] = self.pruned_groups()
        out["bitops_per_token"] = self.bitops()
        return out

    # --- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "summary": self.summary(),
            "other_fp32_params": self.other_params,
            "scale_bits": self.scale_bits,
            **({"w_grid": self.w_grid.value} if self.w_grid is not None else {}),
            "sites": {
                name: {
                    "kind": s.kind.value,
                    "bits": list(s.bits),
                    "group_numel": s.group_numel,
                    "rows_per_group": s.rows_per_group,
                    "in_features": s.in_features,
                    "bias": s.bias,
                    "a_bits": s.a_bits,
                }
                for name, s in self.sites
            },
        }

    def to_json(self) -> str:
        # one site per line, its bits on that line: readable and diff-able
        d = self.to_dict()
        site_lines = [f"    {json.dumps(n)}: {json.dumps(s)}" for n, s in d.pop("sites").items()]
        head = json.dumps(d, indent=2)[:-2]
        return head + ',\n  "sites": {\n' + ",\n".join(site_lines) + "\n  }\n}\n"

    @classmethod
    def from_dict(cls, d: Any, source: str = "architecture") -> "Architecture":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{source} is not a bert-mpq architecture (no \"format\": \"{FORMAT}\")")
        if d.get("version") != VERSION:
            raise ValueError(f"{source} has version {d.get('version')!r}; this bert-mpq reads version {VERSION}")
        try:
            site_items = d["sites"].items()
            built = []
            for name, s in site_items:
                try:
                    built.append((name, SiteArch(
                        kind=SiteKind(s["kind"]), bits=tuple(_whole(b, "bits") for b in s["bits"]),
                        group_numel=_whole(s["group_numel"], "group_numel"),
                        rows_per_group=_whole(s["rows_per_group"], "rows_per_group"),
                        in_features=_whole(s["in_features"], "in_features"), bias=_flag(s["bias"], "bias"),
                        a_bits=None if s.get("a_bits") is None else _whole(s["a_bits"], "a_bits"),
                    )))
                except (KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{source}: site {name!r} is malformed ({type(e).__name__}: {e})") from None
            try:
                return cls(tuple(built), _whole(d["other_fp32_params"], "other_fp32_params"),
                           _whole(d.get("scale_bits", FP32_BITS), "scale_bits"), d.get("w_grid"))
            except ValueError as e:  # the whole record's checks (__post_init__), named with the file
                raise ValueError(f"{source}: {e}") from None
        except (KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"{source} is malformed: missing or wrong {e}") from None

    @classmethod
    def from_json(cls, text: str, source: str = "architecture") -> "Architecture":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} is not valid JSON (line {e.lineno}: {e.msg})") from None
        return cls.from_dict(d, source)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a crash never leaves a half-written architecture.json."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        follow_umask(tmp)  # mkstemp's 0600 would hide the file from the user's group
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Architecture":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"architecture file {path} does not exist; pass the architecture.json a search or hawq run wrote")
        return cls.from_json(path.read_text(), source=str(path))

    # --- supernet ------------------------------------------------------------------------------
    @classmethod
    def from_supernet(cls, model: nn.Module, scale_bits: int = FP32_BITS) -> "Architecture":
        """Argmax of every group's logits (or its fixed choice), on the model's weight grid."""
        built, grids = [], set()
        for name, site in sites(model):
            grids.add(site.wq.cands.mode)
            shape = site.shape()
            a_bits = None
            if site.aq is not None and not site.aq.cands.is_identity:
                a_bits = site.aq.chosen_bits()[0]
            built.append((name, SiteArch(shape.kind, site.wq.chosen_bits(), shape.group_numel, shape.rows_per_group,
                                         shape.in_features, shape.bias, a_bits)))
        if not built:
            raise ValueError("the model has no mixed-precision sites; convert it with supernet.to_supernet first")
        return cls(tuple(built), other_fp32_params(model), scale_bits, grids.pop() if len(grids) == 1 else None)

    def apply(self, model: nn.Module) -> nn.Module:
        """Fix every site of a supernet to this architecture (in place); returns the model. Every site is checked
        before the first is fixed: one that does not fit leaves the model as it was."""
        model_sites = dict(sites(model))
        missing = [n for n in self.names if n not in model_sites]
        extra = [n for n in model_sites if n not in dict(self.sites)]
        if missing or extra:
            raise ValueError(
                f"architecture does not match the model: {len(missing)} sites missing from the model "
                f"{missing[:3]}, {len(extra)} model sites not in the architecture {extra[:3]}"
            )
        act_bits: dict[int, tuple[str, int | None]] = {}  # shared input quantizers must agree (Q/K/V)
        for name, arch in self.sites:
            site = model_sites[name]
            if self.w_grid is not None and site.wq.cands.mode is not self.w_grid:
                raise ValueError(f"the architecture is for the {self.w_grid.name} weight grid, {name} uses "
                                 f"{site.wq.cands.mode.name}; convert with space.w_grid={self.w_grid.name}")
            if site.aq is not None:
                first = act_bits.setdefault(id(site.aq), (name, arch.a_bits))
                if first[1] != arch.a_bits:
                    raise ValueError(f"{name} and {first[0]} share one input quantizer but the architecture gives them "
                                     f"{arch.a_bits} and {first[1]} activation bits; give them the same")
            shape = site.shape()
            if (shape.n_groups, shape.group_numel) != (len(arch.bits), arch.group_numel):
                raise ValueError(
                    f"{name}: architecture has {len(arch.bits)} groups of {arch.group_numel} weights, the model "
                    f"{shape.n_groups} of {shape.group_numel}; convert with the space the architecture was made for"
                )
            # the rest of the record prices the site: a wrong one would report a size the model does not have
            for field in ("kind", "rows_per_group", "in_features", "bias"):
                ours, theirs = getattr(arch.shape, field), getattr(shape, field)
                if ours != theirs:
                    raise ValueError(f"{name}: the architecture's {field} is {ours!r}, the model's {theirs!r}; "
                                     f"write the architecture from this model (a search or hawq run's architecture.json)")
            if any(b not in site.wq.cands.bits for b in arch.bits):
                raise ValueError(f"{name}: the architecture gives it {sorted(set(arch.bits) - set(site.wq.cands.bits))} "
                                 f"bits, which are not among its candidates {list(site.wq.cands.bits)}; convert with a "
                                 f"space that offers them")
            offered = list(site.aq.cands.bits) if site.aq is not None and not site.aq.cands.is_identity else [FP32_BITS]
            if arch.a_bits is not None and arch.a_bits not in offered:
                raise ValueError(f"{name}: the architecture quantizes its input to {arch.a_bits} bits, and the model "
                                 f"offers {offered}; convert with space.a_bits that holds {arch.a_bits}")
        ours = other_fp32_params(model)
        if ours != self.other_params:
            raise ValueError(f"the architecture counts {self.other_params} FP32 parameters outside its sites, the model "
                             f"has {ours} (another head or vocabulary?); write the architecture from this model")
        for name, arch in self.sites:  # all checked: now fix them
            site = model_sites[name]
            site.wq.fix(arch.bits)
            if site.aq is not None and not site.aq.cands.is_identity:
                site.aq.fix([arch.a_bits if arch.a_bits is not None else site.aq.chosen_bits()[0]])
        return model
