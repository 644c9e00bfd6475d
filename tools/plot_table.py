"""The Pareto plot of a comparison table already written as markdown (comparison.md, or a table of BENCHMARKS.md).

    python tools/plot_table.py BENCHMARKS.md --after '## Searched vs HAWQ-V2 vs uniform QAT vs FP32 at equal size on CoLA' \
        --out docs/bench/cola.png --title 'CoLA dev, MiniLM-L6'

For a comparison whose run directories are gone, the table that `search/comparison.py` generated from them is
what is left; this reads the first such table (the header `| method | budget (bits) | encoder bits/weight | ...`)
after the first line that starts with `--after` (from the top without it) and draws it as `stage=compare` draws pareto.png: the
metric's median with bars from its min to its max over the seeds, against the exact encoder MiB, one line per
method, FP32 as a horizontal line. A file without such a table, or a row it cannot read, is a one-line error.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from search.comparison import COLUMNS, Kind, Point
from search.plots import pareto

HEADER = "| " + " | ".join(COLUMNS[:3]) + " |"
DRAWS = re.compile(r"median of (\d+) QAT draws")  # the seeds cell of a comparison with several draws
# "f1 85.11 [85.06, 85.71]", or one seed's "f1 85.62"
METRIC = re.compile(r"^(?P<name>\S+) (?P<median>-?[\d.]+)(?: \[(?P<low>-?[\d.]+), (?P<high>-?[\d.]+)\])?$")


def table_lines(text: str, after: str | None) -> list[str]:
    """The rows (no header, no rule) of the first comparison table after the line starting with `after`."""
    lines = text.splitlines()
    start = 0
    if after is not None:
        start = next((i for i, line in enumerate(lines) if line.startswith(after)), -1)
        if start < 0:
            raise ValueError(f"no line starts with {after!r}")
    head = next((i for i in range(start, len(lines)) if lines[i].startswith(HEADER)), -1)
    if head < 0:
        raise ValueError(f"no comparison table (a line starting with {HEADER!r}) after line {start + 1}")
    if _cells(lines[head]) != COLUMNS:
        raise ValueError(f"the table at line {head + 1} has other columns than comparison.md's: {lines[head]}")
    rows = []
    for line in lines[head + 2:]:  # past the header and its |---| rule
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def point(row: str) -> Point:
    """One row of `search.comparison.markdown`'s table as the Point it was written from."""
    cells = _cells(row)
    if len(cells) != len(COLUMNS):
        raise ValueError(f"a comparison row has {len(COLUMNS)} cells, this one {len(cells)}: {row}")
    method, budget, bits, enc_mb, total_mb, compression, pruned, metric, _others, seeds = cells
    m = METRIC.match(metric)
    if m is None:
        raise ValueError(f"cannot read the metric {metric!r} of: {row}")
    draws = DRAWS.search(seeds)
    try:
        median = float(m["median"])
        return Point(method=Kind(method), budget=None if budget == "FP32" else float(budget),
                     seeds=int(seeds.split()[0]), draws=int(draws[1]) if draws else 1, metric_name=m["name"],
                     median=median, low=float(m["low"] or median), high=float(m["high"] or median),
                     encoder_avg_bits=float(bits), encoder_mb=float(enc_mb), total_mb=float(total_mb),
                     compression=float(compression.rstrip("x")), pruned_groups=float(pruned))
    except ValueError as e:  # a cell that is not a number, a method that is not one of Kind's
        raise ValueError(f"cannot read the row ({e}): {row}") from None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("markdown", type=Path)
    p.add_argument("--after", help="read the first table after the first line that starts with this")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--title", default="")
    args = p.parse_args()
    try:
        points = [point(row) for row in table_lines(args.markdown.read_text(), args.after)]
    except (OSError, ValueError) as e:
        print(f"error: {args.markdown}: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(pareto(points, args.out, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
