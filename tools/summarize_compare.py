"""Summarise comparison runs into one table and plot: a hydra multirun of stage=compare, several compare
runs, or run trees laid out like one (e.g. tools/bench_search.sh output).

    python tools/summarize_compare.py runs/multirun/2026-11-22_10-00-00 [more dirs ...] --out summary/

Reads every metrics.json below the given directories laid out as `fp32/`, `b<budget>/s<seed>/{qat,
hawq_qat,uniform<bits>}/` (see search/comparison.py), takes the median and [min, max] over seeds per method
and budget, and writes comparison.md, comparison.csv, runs.csv and pareto.png to --out (default: the first
directory). A run found twice (a directory and its copy) counts once; two different results for one method,
budget and seed, two FP32 references that differ, or two metrics (two tasks) are an error naming both runs, since
pooling them would miscount the seeds. Prints comparison.md. With `--before DIR [DIR ...]` (the same runs under other settings) it also
prints, for every run found in both, the metric before and after and the change (and the change of every other
metric both report, such as SST-2's labelled test set), and the median changes per method and budget.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from search.comparison import LAYOUT, collect, paired, write_comparison


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="where to write (default: the first root)")
    p.add_argument("--title", default=None, help="title of the table and plot")
    p.add_argument("--before", nargs="+", type=Path, default=[],
                   help="the same runs under other settings: print the change of every run found in both")
    args = p.parse_args()
    missing = [str(r) for r in [*args.roots, *args.before] if not r.is_dir()]
    if missing:
        print(f"error: no such directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        rows, before = collect(args.roots), collect(args.before)
    except ValueError as e:  # a metrics.json that is not a finished run's, or runs of different settings
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: no finished comparison runs below {', '.join(map(str, args.roots))} (expected {LAYOUT})",
              file=sys.stderr)
        return 2
    out = args.out or args.roots[0]
    try:
        _, paths = write_comparison(rows, out, args.title or " + ".join(str(r) for r in args.roots))
    except OSError as e:
        print(f"error: cannot write the summary to {out}: {e.strerror or e}; give a writable --out", file=sys.stderr)
        return 2
    print(paths["comparison.md"].read_text())
    if args.before:
        print(paired(rows, before))
    return 0


if __name__ == "__main__":
    sys.exit(main())
