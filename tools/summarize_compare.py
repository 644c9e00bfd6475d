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
Several QAT draws per seed (`compare.qat_draws`) count as their median; `--max-draws N` reads only each seed's
first N draws (1: as if the comparison had run one), and `--per-draw` prints every draw, how far QAT alone
moves a seed against how far the seeds' medians lie apart, and a one-way ANOVA's p of the seeds' draws (small:
the seeds' architectures differ by more than QAT's own spread).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from search.comparison import LAYOUT, collect, collect_draws, draws_table, paired, pool_draws, write_comparison


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="where to write (default: the first root)")
    p.add_argument("--title", default=None, help="title of the table and plot")
    p.add_argument("--before", nargs="+", type=Path, default=[],
                   help="the same runs under other settings: print the change of every run found in both")
    p.add_argument("--max-draws", type=int, default=None, metavar="N",
                   help="read only each seed's first N QAT draws (default: all)")
    p.add_argument("--per-draw", action="store_true", help="also print every QAT draw of every seed, and their spread")
    args = p.parse_args()
    if args.max_draws is not None and args.max_draws < 1:
        print(f"error: --max-draws {args.max_draws} is invalid; give 1 or more", file=sys.stderr)
        return 2
    missing = [str(r) for r in [*args.roots, *args.before] if not r.is_dir()]
    if missing:
        print(f"error: no such directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        runs = collect_draws(args.roots, args.max_draws)  # read once: pooled for the table, as they are for --per-draw
        rows, before = pool_draws(runs), collect(args.before, args.max_draws)
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
    if args.per_draw:
        print(draws_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
