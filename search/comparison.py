"""The side-by-side table: per-run rows read from run directories, aggregated over seeds, written out.

A comparison directory (the `compare` stage's, or any tree laid out like it, such as hydra multirun jobs
or `tools/bench_search.sh` output) holds
    fp32/metrics.json                          the FP32 reference
    b<budget>/s<seed>/qat/metrics.json         searched + QAT
    b<budget>/s<seed>/hawq_qat/metrics.json    HAWQ-V2 at the searched size + the same QAT
    b<budget>/s<seed>/uniform<bits>/metrics.json  uniform-precision QAT
and, with several QAT draws per architecture (`compare.qat_draws`), `qat.draw1/`, `hawq_qat.draw1/`, ...
beside them. `collect` turns every such metrics.json into a `Row`, one per (method, budget, seed): the median
of its draws; `aggregate` takes the median and the spread over
seeds per (method, budget); `write_comparison` writes comparison.md (with a plain verdict against the
baselines, and the searched model's lead paired by seed with its 95% interval: `paired_difference`),
comparison.csv, runs.csv and pareto.png. Nothing is typed by hand.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import statistics
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Sequence

from supernet import MIB, Architecture

from .config import Method
from .rundir import write_atomic, write_text_atomic

__all__ = ["Kind", "Row", "Point", "collect", "collect_draws", "pool_draws", "draws_table", "draw_name", "aggregate",
           "write_comparison", "budget_dir", "verdict", "target_met", "on_split",
           "QUALITY_TOLERANCE", "quality_misses",
           "standings", "seeds_ahead", "paired_difference", "Difference", "method_of", "LAYOUT"]


class Kind(str, Enum):
    """Who made a row of the table: the FP32 reference or one of the compared methods."""

    fp32 = "fp32"
    searched = Method.searched.value
    hawq = Method.hawq.value
    uniform = Method.uniform.value


# child directory of a cell -> method
_CHILDREN = {"qat": Kind.searched, "hawq_qat": Kind.hawq}
_UNIFORM = re.compile(r"uniform(\d+)$")
_CELL = re.compile(r"b([0-9.]+)$"), re.compile(r"s(\d+)$")
_DRAW = re.compile(r"(.+)\.draw(\d+)$")  # QAT draw k >= 1 of a step (`draw_name`)


# what `collect` looks for, in the words of an error that found none
LAYOUT = "fp32/ or b<budget>/s<seed>/<qat|hawq_qat|uniformN>/metrics.json"


def draw_name(step: str, draw: int) -> str:
    """The directory of QAT draw `draw` of `step` (qat, hawq_qat, uniform2): the step itself for draw 0, else
    `<step>.draw<k>` (what `method_of` parses back)."""
    return step if draw == 0 else f"{step}.draw{draw}"


def budget_dir(budget: float, seed: int) -> str:
    """The cell of one budget and seed: b2.5/s42."""
    return f"b{budget:g}/s{seed}"


@dataclass(frozen=True)
class Row:
    """One evaluated model of a comparison."""

    method: Kind
    budget: float | None  # None for FP32
    seed: int | None
    metric_name: str
    metric: float
    encoder_avg_bits: float
    encoder_mb: float
    total_mb: float
    compression: float  # FP32 total bytes / total bytes
    pruned_groups: int
    run_dir: str
    fp32_encoder_mb: float = float("nan")  # the same model in FP32
    fp32_total_mb: float = float("nan")
    # the main split's other metrics (MRPC: accuracy beside F1), then the other splits' main metrics
    others: tuple[tuple[str, float], ...] = ()
    draws: int = 1  # QAT runs (draws) of this architecture and seed: `metric` and `others` are their medians
    split: str | None = None  # the split `metric` is on ("validation"), where metrics.json names it


def _row(path: Path, method: Kind, budget: float | None, seed: int | None) -> Row:
    """The row of one run's metrics.json; a file that cannot be read as one is a ValueError naming it."""
    try:
        return _read_row(path, method, budget, seed)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # truncated, or not a finished stage's metrics.json
        raise ValueError(f"{path} is not a finished run's metrics.json ({type(e).__name__}: {e}); "
                         f"re-run that step or move the file out of the way") from e


def split_metric(split: str, metric: str) -> str:
    """The name under which a row's `others` keep another split's main metric: "test_labeled accuracy"."""
    return f"{split} {metric}"


def _read_row(path: Path, method: Kind, budget: float | None, seed: int | None) -> Row:
    m = json.loads(path.read_text())
    arch = m.get("architecture") or {}
    main = m["main_metric"]["name"]
    split = m.get("split") or next(iter(m.get("splits") or {}), None)
    metrics = (m.get("splits") or {}).get(split, {}).get("metrics", {})
    others = tuple((k, float(v)) for k, v in metrics.items() if k != main)
    # the extra evaluated splits (SST-2's labelled test set) by their main metric: "test_labeled accuracy"
    others += tuple((split_metric(name, s["main_metric"]["name"]), float(s["main_metric"]["value"]))
                    for name, s in (m.get("splits") or {}).items() if name != split and "main_metric" in s)
    return Row(method, budget, seed, m["main_metric"]["name"], float(m["main_metric"]["value"]),
               float(arch.get("encoder_avg_bits", 32.0)), float(arch.get("encoder_mb", float("nan"))),
               float(arch.get("total_mb", float("nan"))), float(arch.get("total_compression") or 1.0),
               int(arch.get("pruned_groups", 0)), str(path.parent),
               *_fp32_mb(path.parent, arch),
               others, split=split)


def _fp32_mb(run_dir: Path, arch: dict[str, Any]) -> tuple[float, float]:
    """(encoder, total) MiB of the model in FP32: from the summary, else from the run's architecture.json."""
    if "encoder_fp32_mb" in arch:
        return float(arch["encoder_fp32_mb"]), float(arch["total_fp32_mb"])
    path = run_dir / "architecture.json"
    if not path.is_file():
        return float("nan"), float("nan")
    a = Architecture.load(path)
    return a.fp32_bytes("encoder") / MIB, a.fp32_bytes("total") / MIB


def _fp32_sizes(rows: list[Row]) -> list[Row]:
    """The FP32 reference's sizes (its eval run has no architecture), from any quantized run of the same model."""
    quantized = next((r for r in rows if r.method is not Kind.fp32 and r.fp32_encoder_mb == r.fp32_encoder_mb), None)
    if quantized is None:
        return rows
    fp32_encoder, fp32_total = quantized.fp32_encoder_mb, quantized.fp32_total_mb
    return [dataclasses.replace(r, encoder_mb=fp32_encoder, total_mb=fp32_total) if r.method is Kind.fp32 else r
            for r in rows]


def method_of(child: str) -> tuple[Kind | None, int]:
    """The method and QAT draw of a cell's child directory: (searched, 0) for qat/, (uniform, 2) for uniform2.draw2/."""
    draw = _DRAW.match(child)
    step, k = (draw.group(1), int(draw.group(2))) if draw else (child, 0)
    return _CHILDREN.get(step) or (Kind.uniform if _UNIFORM.match(step) else None), k


def collect(roots: Iterable[Path], max_draws: int | None = None) -> list[Row]:
    """Every finished run below `roots` laid out as a comparison (see the module docstring), one row per
    (method, budget, seed): several QAT draws of one architecture and seed become their median (of the first
    `max_draws` draws, when given: 1 reads each seed's first QAT run alone, as a comparison of one draw has it)."""
    return pool_draws(collect_draws(roots, max_draws))


def on_split(rows: Sequence[Row], split: str) -> list[Row]:
    """`rows` judged on another evaluated split (SST-2's `test_labeled`): each row's main metric on `split`, which
    `collect` keeps among its `others` (named by `split_metric`), in place of the main split's; a row whose main split
    is `split` stays as it is. A row without it is a ValueError naming its run, since judging some runs on dev and
    others on test would mix two measures."""
    judged = []
    for r in rows:
        if r.split == split:  # judged on its main split already
            judged.append(r)
            continue
        name = split_metric(split, r.metric_name)
        value = dict(r.others).get(name)
        if value is None:
            raise ValueError(f"{r.run_dir} has no {name} result; evaluate that split (eval.splits=[{split}]) "
                             f"or judge on the main split")
        judged.append(dataclasses.replace(r, metric_name=name, metric=value))
    return judged


def collect_draws(roots: Iterable[Path], max_draws: int | None = None) -> list[tuple[int, Row]]:
    """Every finished run below `roots` as (QAT draw, row), each run once (see `_one_each`), draws not pooled;
    only draws below `max_draws` when given."""
    rows: list[tuple[int, Row]] = []
    for root in roots:
        for path in sorted(Path(root).rglob("metrics.json")):
            child, seed_dir, budget_dir_ = path.parent.name, path.parent.parent.name, path.parent.parent.parent.name
            if child == "fp32":
                rows.append((0, _row(path, Kind.fp32, None, None)))
                continue
            method, draw = method_of(child)
            b, s = _CELL[0].match(budget_dir_), _CELL[1].match(seed_dir)
            if method is not None and b and s and (max_draws is None or draw < max_draws):
                rows.append((draw, _row(path, method, float(b.group(1)), int(s.group(1)))))
    return _one_each(rows)


def draws_table(runs: Sequence[tuple[int, Row]]) -> str:
    """How much of a comparison's spread is QAT's own (markdown; `runs` as `collect_draws` gives them): per
    method, budget and seed the metric of every QAT draw of its one architecture, their median and range; then
    per method and budget the mean over every draw, the median range within a seed (what QAT alone moves) against
    the range of the seeds' medians (what the seeds move: the architecture, with what is left of QAT's spread), and
    a one-way ANOVA's p over the seeds' draws: small where the seeds' architectures differ by more than QAT's
    spread explains (needs two draws or more of every seed)."""
    from scipy.stats import f_oneway
    by: dict[tuple[str, float, int], dict[int, float]] = {}
    order = list(Kind)
    for draw, r in runs:
        if r.method is not Kind.fp32:
            by.setdefault((r.method.value, r.budget, r.seed), {})[draw] = r.metric
    if not by:
        return "No quantized run to show.\n"
    keys = sorted(by, key=lambda k: (-k[1], order.index(Kind(k[0])), k[2]))
    width = max(max(d) for d in by.values()) + 1
    head = " | ".join(f"draw {d}" for d in range(width))
    lines = [f"| method | budget (bits) | seed | {head} | median | max - min |", "|---|---|---|" + "---|" * (width + 2)]
    per_cell: dict[tuple[str, float], list[list[float]]] = {}
    for k in keys:
        values = by[k]
        ordered = [values[d] for d in sorted(values)]
        median, spread = _median(ordered), max(ordered) - min(ordered)
        per_cell.setdefault(k[:2], []).append(ordered)
        cells = [f"{values[d]:.2f}" if d in values else "-" for d in range(width)]
        lines.append(f"| {k[0]} | {k[1]:g} | {k[2]} | " + " | ".join(cells) + f" | {median:.2f} | {spread:.2f} |")
    lines += ["", "| method | budget (bits) | seeds | draws | mean of every draw | median range within a seed "
              "(QAT draws) | range of the seeds' medians | seeds differ (ANOVA p) |", "|---" * 8 + "|"]
    for (method, budget), found in per_cell.items():
        medians, every = [_median(v) for v in found], [x for v in found for x in v]
        testable = len(found) > 1 and all(len(v) > 1 for v in found) and len(set(every)) > 1
        p = f"{f_oneway(*found).pvalue:.3f}" if testable else "-"
        lines.append(f"| {method} | {budget:g} | {len(found)} | {len(every)} | {statistics.fmean(every):.2f} | "
                     f"{_median([max(v) - min(v) for v in found]):.2f} | {max(medians) - min(medians):.2f} | {p} |")
    return "\n".join(lines) + "\n"


def pool_draws(rows: list[tuple[int, Row]]) -> list[Row]:
    """One row per (method, budget, seed) of `rows` (as `collect_draws` gives them): the median metric (and other
    metrics) of its QAT draws, with `draws` set, the sizes and `run_dir` of its first draw. A seed with one run
    keeps its row as it is. The FP32 reference gets its sizes from the quantized runs."""
    by: dict[tuple[Kind, float | None, int | None], list[tuple[int, Row]]] = {}
    for draw, r in rows:
        by.setdefault((r.method, r.budget, r.seed), []).append((draw, r))
    pooled = []
    for found in by.values():
        found.sort(key=lambda dr: dr[0])
        first = found[0][1]
        if len(found) == 1:
            pooled.append(first)
            continue
        rs = [r for _, r in found]
        others = tuple((k, _median([dict(r.others).get(k, math.nan) for r in rs])) for k, _ in first.others)
        pooled.append(dataclasses.replace(first, metric=_median([r.metric for r in rs]), others=others, draws=len(rs)))
    return _fp32_sizes(pooled)


def _median(values: Sequence[float]) -> float:
    """The median, or NaN when any value is NaN (sorting NaN among numbers gives an order-dependent answer)."""
    return math.nan if any(map(math.isnan, values)) else statistics.median(values)


def _same(x: float, y: float) -> bool:
    return x == y or (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)


def _one_each(rows: list[tuple[int, Row]]) -> list[tuple[int, Row]]:
    """`rows` ((QAT draw, row) pairs) with each run once, checked to belong to one table. The same run reached
    twice (a directory and its copy, or one passed twice) counts once; two different results for one (method,
    budget, seed, draw), two FP32 references that differ, or two metrics are a ValueError naming both runs: such
    directories come from different settings, checkpoints or tasks, and pooling them would make the medians and
    seed counts wrong."""
    kept: dict[tuple[Kind, float | None, int | None, int], Row] = {}
    for draw, r in rows:
        first = next(iter(kept.values()), None)
        if first is not None and r.metric_name != first.metric_name:
            raise ValueError(f"{r.run_dir} reports {r.metric_name} but {first.run_dir} reports {first.metric_name}; "
                             f"pass the directories of one task at a time")
        key = (r.method, r.budget, r.seed, draw)
        seen = kept.get(key)
        if seen is None:
            kept[key] = r
        elif not _same(seen.metric, r.metric):
            what = ("the FP32 reference" if r.method is Kind.fp32 else
                    f"{r.method.value} at {r.budget:g} bits, seed {r.seed}" + (f", QAT draw {draw}" if draw else ""))
            raise ValueError(f"two different results for {what}: {seen.metric:.4f} in {seen.run_dir} and "
                             f"{r.metric:.4f} in {r.run_dir}; they come from different settings, checkpoints or "
                             f"tasks: pass only the directories of one comparison")
    return [(key[3], r) for key, r in kept.items()]


@dataclass(frozen=True)
class Point:
    """One method at one budget over its seeds."""

    method: Kind
    budget: float | None
    seeds: int
    metric_name: str
    median: float
    low: float
    high: float
    encoder_avg_bits: float
    encoder_mb: float
    total_mb: float
    compression: float
    pruned_groups: float
    others: tuple[tuple[str, float], ...] = ()  # medians of the other metrics
    draws: int = 1  # the fewest QAT draws behind one seed's metric


def aggregate(rows: Sequence[Row]) -> list[Point]:
    """Median and [min, max] of the metric over seeds, per (method, budget); sizes are medians too.

    The FP32 reference is one model: several copies of it (one per multirun job) count once.
    """
    groups: dict[tuple[Kind, float | None], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.method, r.budget), []).append(r)
    points = []
    for (method, budget), rs in groups.items():
        if method is Kind.fp32:
            rs = rs[:1]
        values = [r.metric for r in rs]

        def med(attr: str) -> float:
            return statistics.median(getattr(r, attr) for r in rs)

        names = [k for k, _ in rs[0].others]
        others = tuple((k, statistics.median(dict(r.others).get(k, float("nan")) for r in rs)) for k in names)
        # a run whose metric is not a number (STS-B's Pearson on constant predictions) makes the cell one:
        # sorting NaN among numbers would give a median that depends on the order of the runs
        median, low, high = ((statistics.median(values), min(values), max(values)) if not any(map(math.isnan, values))
                             else (math.nan,) * 3)
        points.append(Point(method, budget, len(rs), rs[0].metric_name, median, low,
                            high, med("encoder_avg_bits"), med("encoder_mb"), med("total_mb"),
                            med("compression"), med("pruned_groups"), others, min(r.draws for r in rs)))
    order = list(Kind)
    return sorted(points, key=lambda p: (-(p.budget or 99), order.index(p.method)))


def _find(points: Sequence[Point], method: Kind, budget: float | None) -> Point | None:
    return next((p for p in points if p.method is method and p.budget == budget), None)


def target_met(points: Sequence[Point], budget: float) -> bool | None:
    """Issue #6's target at `budget`: the searched median at least HAWQ-V2's at <= 4 bits; at <= 2.5 bits at
    least 1 point above HAWQ-V2's and further above uniform QAT's. None when there is nothing to judge."""
    s, need = _find(points, Kind.searched, budget), target_needs(points, budget)
    return None if s is None or need is None else s.median >= need


def target_needs(points: Sequence[Point], budget: float) -> float | None:
    """The lowest searched median that would meet issue #6's target at `budget` against these baselines (`target_met`):
    HAWQ-V2's median at <= 4 bits, 1 point above it at <= 2.5 bits; infinity where no searched score can meet it
    (at <= 2.5 bits uniform QAT is at or above HAWQ-V2, so the lead over uniform cannot be the larger one); NaN
    where HAWQ-V2's metric is not a number. None when there is nothing to judge."""
    hawq, uni = (_find(points, k, budget) for k in (Kind.hawq, Kind.uniform))
    if hawq is None or budget > 4:
        return None
    if math.isnan(hawq.median):
        return math.nan
    if budget <= 2.5:
        return hawq.median + 1 if uni is None or uni.median < hawq.median else math.inf
    return hawq.median


# issue #4's quality targets: the searched model within this many points of FP32 at each budget (bits), and above
# uniform QAT at the same budget
QUALITY_TOLERANCE = {4.0: 0.3, 3.0: 0.5, 2.0: 1.0, 1.5: 2.5}


def quality_misses(points: Sequence[Point], budget: float) -> list[str] | None:
    """What keeps the searched median from issue #4's quality target at `budget` (`QUALITY_TOLERANCE`): further
    below FP32 than allowed, or not above uniform QAT. [] when it is met; None when there is nothing to judge (no
    target at this budget, or the searched run, FP32 or uniform QAT missing)."""
    s, uni = _find(points, Kind.searched, budget), _find(points, Kind.uniform, budget)
    fp = _find(points, Kind.fp32, None)
    tolerance = QUALITY_TOLERANCE.get(budget)
    if tolerance is None or s is None or fp is None or uni is None:
        return None
    if any(math.isnan(p.median) for p in (s, fp, uni)):
        return ["not comparable (a metric is not a number)"]
    misses = []
    gap = fp.median - s.median
    if gap > tolerance and not _same(gap, tolerance):  # 0.3 below is within 0.3, whatever the rounding
        misses.append(f"{gap:.2f} below FP32, allowed {tolerance:g}")
    if s.median <= uni.median:
        misses.append("uniform " + ("equal" if s.median == uni.median else "ahead"))
    return misses


def _quality(misses: list[str] | None) -> str:
    """`quality_misses` in words."""
    if misses is None:
        return "-"
    return "met" if not misses else f"**not met** ({'; '.join(misses)})"


def _needs(need: float | None) -> str:
    """`target_needs` in words."""
    if need is None:
        return "-"
    if math.isnan(need):
        return "not comparable (HAWQ-V2's metric is not a number)"
    return "out of reach (uniform >= HAWQ-V2)" if math.isinf(need) else f"{need:.2f}"


def verdict(points: Sequence[Point]) -> list[str]:
    """Plain sentences: at each budget, how the searched model's median compares with each baseline, and
    whether the target (`target_met`) holds."""
    lines = []
    for budget in sorted({p.budget for p in points if p.budget is not None}, reverse=True):
        s = _find(points, Kind.searched, budget)
        if s is None:
            continue
        parts = []
        for base in (Kind.hawq, Kind.uniform):
            b = _find(points, base, budget)
            if b is not None:
                delta = s.median - b.median
                if math.isnan(delta):
                    parts.append(f"not comparable with {base.value} (a metric is not a number)")
                    continue
                word = "above" if delta > 0 else "below"
                parts.append(f"{abs(delta):.2f} points {word} {base.value}" if delta else f"equal to {base.value}")
        target = target_met(points, budget)
        met = "" if target is None else (" - target met" if target else " - **target not met**")
        if target is False:
            met += f" (searched needs: {_needs(target_needs(points, budget))})"
        lines.append(f"- {budget:g} bits ({s.seeds} seed{'s' * (s.seeds != 1)}): searched {s.metric_name} "
                     f"{s.median:.2f}, {'; '.join(parts) or 'no baseline'}{met}.")
    return lines


STANDINGS_COLUMNS = ["task", "budget (bits)", "FP32", "searched", "HAWQ-V2", "uniform", "searched - HAWQ-V2",
                     "searched - uniform", "target", "seeds"]
SEEDS_AHEAD_COLUMNS = ["seeds ahead of HAWQ-V2", "seeds ahead of uniform"]
NEEDS_COLUMNS = ["searched needs"]
CI_COLUMNS = ["searched - HAWQ-V2, paired mean [95% CI]", "searched - uniform, paired mean [95% CI]"]
QUALITY_COLUMNS = ["searched - FP32", "#4 target"]


def _differences(rows: Sequence[Row], budget: float, base: Kind) -> list[float]:
    """The searched model's metric minus `base`'s at `budget`, one per seed that has both, in seed order."""
    def by_seed(kind: Kind) -> dict[int | None, float]:  # seed -> metric
        return {r.seed: r.metric for r in rows if r.method is kind and r.budget == budget}

    searched, other = by_seed(Kind.searched), by_seed(base)
    return [searched[s] - other[s] for s in sorted(set(searched) & set(other))]


def seeds_ahead(rows: Sequence[Row], budget: float, base: Kind) -> tuple[int, int] | None:
    """(k, n): of the n seeds with both a searched and a `base` run at `budget`, the k where the searched model
    scores strictly higher. Pairing by seed takes out the spread between seeds that a difference of medians
    carries; None when no seed has both."""
    found = _differences(rows, budget, base)
    return (sum(d > 0 for d in found), len(found)) if found else None


@dataclass(frozen=True)
class Difference:
    """The searched model's lead over a baseline, paired by seed: the mean over `n` seeds and its two-sided 95%
    t-interval [low, high] (NaN bounds with one seed, which gives no spread)."""

    n: int
    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        if math.isnan(self.mean):
            return "not comparable (a metric is not a number)"
        if self.n < 2:
            return f"{self.mean:+.2f} (1 seed)"
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"

    @property
    def resolved(self) -> bool:
        """Whether the interval leaves out 0: these seeds tell the two methods apart."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def paired_difference(rows: Sequence[Row], budget: float, base: Kind) -> Difference | None:
    """The searched model's lead over `base` at `budget`, paired by seed (each seed's pooled metric, see `collect`):
    the mean of the per-seed differences with Student's 95% t-interval over the seeds. The seed is the unit that
    varies the architecture; with several QAT draws per seed their median is that seed's value. None when no
    seed has both methods."""
    from scipy.stats import t

    found = _differences(rows, budget, base)
    if not found:
        return None
    mean = statistics.fmean(found)
    if len(found) < 2 or any(map(math.isnan, found)):
        return Difference(len(found), mean, math.nan, math.nan)
    half = t.ppf(0.975, len(found) - 1) * statistics.stdev(found) / math.sqrt(len(found))
    return Difference(len(found), mean, mean - half, mean + half)


def paired_lines(rows: Sequence[Row]) -> list[str]:
    """Plain sentences, per budget with two seeds or more of a pair: the searched model's mean lead over each
    baseline paired by seed, its 95% t-interval, and whether these seeds tell the two apart."""
    lines = []
    for budget in sorted({r.budget for r in rows if r.budget is not None}, reverse=True):
        found = {base: paired_difference(rows, budget, base) for base in (Kind.hawq, Kind.uniform)}
        found = {base: d for base, d in found.items() if d is not None and d.n >= 2 and not math.isnan(d.mean)}
        parts = [f"searched - {base.value} {d} over {d.n} seeds ("
                 f"{'apart' if d.resolved else 'not apart: the interval holds 0'})" for base, d in found.items()]
        if parts:
            lines.append(f"- {budget:g} bits: " + "; ".join(parts) + ".")
    return lines


def standings(tasks: Sequence[tuple[str, Sequence[Row]]], by_seed: bool = False, needs: bool = False,
              ci: bool = False, quality: bool = False) -> str:
    """One markdown table over several tasks' comparisons (each task's runs, as `collect` reads them): per task
    and budget the median metric of FP32 and of every method, the searched model's lead over each baseline
    (negative: it loses) and issue #6's target. With `by_seed` two more columns say on how many seeds the
    searched model is ahead of each baseline, paired by seed (`seeds_ahead`). With `needs` one more says which
    searched median would meet the target (`target_needs`), or that none can. With `ci` two more give the
    searched model's mean lead over each baseline paired by seed and its 95% t-interval (`paired_difference`). With
    `quality` two more give the searched median's distance from FP32 and issue #4's target (`quality_misses`)."""

    def cell(p: Point | None) -> str:
        return "-" if p is None else f"{p.median:.2f}"

    def lead(s: Point | None, base: Point | None) -> str:
        return "-" if s is None or base is None else f"{s.median - base.median:+.2f}"

    def ahead(task_rows: Sequence[Row], budget: float, base: Kind) -> str:
        found = seeds_ahead(task_rows, budget, base)
        return "-" if found is None else f"{found[0]}/{found[1]}"

    def interval(task_rows: Sequence[Row], budget: float, base: Kind) -> str:
        found = paired_difference(task_rows, budget, base)
        return "-" if found is None else str(found)

    columns = (STANDINGS_COLUMNS + (SEEDS_AHEAD_COLUMNS if by_seed else []) + (NEEDS_COLUMNS if needs else [])
               + (CI_COLUMNS if ci else []) + (QUALITY_COLUMNS if quality else []))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for task, rows in tasks:
        points = aggregate(rows)
        fp, name = _find(points, Kind.fp32, None), next(p.metric_name for p in points)
        for budget in sorted({p.budget for p in points if p.budget is not None}, reverse=True):
            s, hawq, uni = (_find(points, k, budget) for k in (Kind.searched, Kind.hawq, Kind.uniform))
            target = target_met(points, budget)
            seeds = sorted({p.seeds for p in (s, hawq, uni) if p is not None})
            values = [f"{task} ({name})", f"{budget:g}", cell(fp), cell(s), cell(hawq), cell(uni), lead(s, hawq),
                      lead(s, uni), "-" if target is None else ("met" if target else "**not met**"),
                      "/".join(map(str, seeds))]
            if by_seed:
                values += [ahead(rows, budget, Kind.hawq), ahead(rows, budget, Kind.uniform)]
            if needs:
                values.append(_needs(target_needs(points, budget)))
            if ci:
                values += [interval(rows, budget, Kind.hawq), interval(rows, budget, Kind.uniform)]
            if quality:
                values += [lead(s, fp), _quality(quality_misses(points, budget))]
            lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def paired(rows: Sequence[Row], before: Sequence[Row]) -> str:
    """How a change of settings moved each run: a markdown table of the runs (method, budget, seed) found in
    both `before` and `rows`, their metrics and the difference (also of every other metric both runs report,
    such as SST-2's labelled test set), then the median differences per method and budget.

    Pairs share the seed, so the difference is the change's, not the spread between seeds.
    """
    old = {(r.method, r.budget, r.seed): r for r in before if r.method is not Kind.fp32}
    pairs = sorted(((r.method.value, r.budget, r.seed), old[(r.method, r.budget, r.seed)], r)
                   for r in rows if (r.method, r.budget, r.seed) in old)
    if not pairs:
        return "No run (method, budget, seed) is in both sets.\n"
    shared = [k for k, _ in pairs[0][2].others if all(k in dict(x.others) and k in dict(y.others) for _, x, y in pairs)]

    def changes(x: Row, y: Row) -> list[float]:
        return [y.metric - x.metric] + [dict(y.others)[k] - dict(x.others)[k] for k in shared]

    extra = "".join(f" {k}: change |" for k in shared)
    lines = ["| method | budget (bits) | seed | before | after | change |" + extra, "|---|---|---|---|---|---|" + "---|" * len(shared)]
    lines += [f"| {m} | {b:g} | {s} | {x.metric:.2f} | {y.metric:.2f} | " + " | ".join(f"{d:+.2f}" for d in changes(x, y)) + " |"
              for (m, b, s), x, y in pairs]
    by: dict[tuple[str, float], list[list[float]]] = {}
    for (m, b, _), x, y in pairs:
        by.setdefault((m, b), []).append(changes(x, y))
    lines += ["", "| method | budget (bits) | pairs | median change |" + "".join(f" {k}: median change |" for k in shared),
              "|---|---|---|---|" + "---|" * len(shared)]
    lines += [f"| {m} | {b:g} | {len(d)} | " + " | ".join(f"{statistics.median(col):+.2f}" for col in zip(*d)) + " |"
              for (m, b), d in sorted(by.items())]
    return "\n".join(lines) + "\n"


def _fmt(p: Point) -> list[str]:
    spread = f"{p.median:.2f} [{p.low:.2f}, {p.high:.2f}]" if p.seeds > 1 else f"{p.median:.2f}"
    return [p.method.value, "FP32" if p.budget is None else f"{p.budget:g}", f"{p.encoder_avg_bits:.3f}",
            f"{p.encoder_mb:.3f}", f"{p.total_mb:.3f}", f"{p.compression:.2f}x", f"{p.pruned_groups:.0f}",
            f"{p.metric_name} {spread}", ", ".join(f"{k} {v:.2f}" for k, v in p.others),
            str(p.seeds) + (f" (median of {p.draws} QAT draws each)" if p.draws > 1 else "")]


COLUMNS = ["method", "budget (bits)", "encoder bits/weight", "encoder MiB", "total MiB", "compression (total)",
           "pruned groups", "metric median [min, max]", "other metrics (median)", "seeds"]


def markdown(points: Sequence[Point], title: str, rows: Sequence[Row] = ()) -> str:
    """comparison.md: the table of `points`, the verdict on their medians and, from the per-seed `rows`, the
    searched model's lead paired by seed with its 95% interval where two seeds or more have both methods."""
    lines = [f"# {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(p)) + " |" for p in points]
    found = verdict(points)
    if found:
        lines += ["", "Searched vs the baselines (medians):", "", *found]
    found = paired_lines(rows)
    if found:
        lines += ["", "Searched vs the baselines, paired by seed (mean difference [95% t-interval over the seeds]):",
                  "", *found]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, records: Sequence[Any]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            if records:
                w = csv.DictWriter(f, [fl.name for fl in fields(records[0])])
                w.writeheader()
                for r in records:
                    w.writerow({k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(r).items()})

    write_atomic(path, write)


def write_comparison(rows: Sequence[Row], out: Path, title: str) -> tuple[list[Point], dict[str, Path]]:
    """comparison.md, comparison.csv (aggregated), runs.csv (every run) and pareto.png in `out`."""
    from .plots import pareto  # matplotlib only when there is something to draw

    points = aggregate(rows)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("comparison.md", "comparison.csv", "runs.csv", "pareto.png")}
    write_text_atomic(paths["comparison.md"], markdown(points, title, rows))
    _write_csv(paths["comparison.csv"], points)
    _write_csv(paths["runs.csv"], rows)
    pareto(points, paths["pareto.png"], title)
    return points, paths
