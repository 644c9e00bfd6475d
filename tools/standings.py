"""Where the search stands against the baselines, over several tasks: one generated markdown table.

    python tools/standings.py 'SST-2=runs/bench/compare/sst2_s4[234]_[ab]' 'MRPC=runs/bench/compare/mrpc_v3_s4*' ...

Each argument is NAME=GLOB[,GLOB...]: the comparison directories of one task (laid out as `stage=compare`
writes them; see search/comparison.py). Per task and budget it prints the median metric of FP32, the searched
model, HAWQ-V2 and uniform QAT over the seeds found, the searched model's lead over each baseline (negative
where it loses) and whether issue #6's target holds (>= HAWQ-V2 at <= 4 bits; at <= 2.5 bits +1 point over
HAWQ-V2 and more over uniform). `--seeds-ahead` adds, per baseline, on how many seeds the searched model
scores higher than it, paired by seed (k/n); `--needs` the searched median that would meet the target against
these baselines, or "out of reach" where uniform is at or above HAWQ-V2 at <= 2.5 bits; `--ci` the searched
model's mean lead over each baseline paired by seed, with its 95% t-interval over the seeds (a lead whose
interval holds 0 is one these seeds cannot tell from none). Several QAT draws per seed
(`compare.qat_draws`) count as their median; `--max-draws N` reads each seed's first N alone. A pattern that matches no
directory, a task with no finished quantized run, or runs that cannot be pooled (two results for one method, budget
and seed; two tasks) are errors. `--split NAME` judges every run on another evaluated split, e.g. SST-2's
`test_labeled`, in place of dev (a run that did not evaluate it is an error). `--quality` adds the searched median's
distance from FP32 and issue #4's quality target: within 0.3 point of FP32 at 4 bits, 0.5 at 3, 1 at 2 and 2.5 at 1.5
bits, and above uniform QAT (what misses it is named).
"""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

from search.comparison import LAYOUT, collect, on_split, standings


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tasks", nargs="+", metavar="NAME=GLOB[,GLOB...]")
    p.add_argument("--seeds-ahead", action="store_true",
                   help="add the seeds on which the searched model is ahead of each baseline (paired by seed)")
    p.add_argument("--needs", action="store_true",
                   help="add the searched median that would meet #6's target, or 'out of reach' where uniform >= HAWQ-V2")
    p.add_argument("--ci", action="store_true",
                   help="add the searched model's mean lead over each baseline, paired by seed, with its 95%% t-interval")
    p.add_argument("--quality", action="store_true",
                   help="add the searched median's distance from FP32 and #4's target (within 0.3/0.5/1/2.5 of FP32 at "
                        "4/3/2/1.5 bits, above uniform)")
    p.add_argument("--max-draws", type=int, default=None, metavar="N",
                   help="read only each seed's first N QAT draws (default: all; 1: as a comparison of one draw)")
    p.add_argument("--split", default=None, metavar="NAME",
                   help="judge on this evaluated split (e.g. test_labeled, SST-2's labelled test set) in place of dev")
    args = p.parse_args()
    if args.max_draws is not None and args.max_draws < 1:
        print(f"error: --max-draws {args.max_draws} is invalid; give 1 or more", file=sys.stderr)
        return 2
    tasks = []
    for spec in args.tasks:
        name, sep, patterns = spec.partition("=")
        if not sep or not name or not patterns:
            print(f"error: {spec!r} is not NAME=GLOB[,GLOB...]; e.g. 'SST-2=runs/compare/sst2_*'", file=sys.stderr)
            return 2
        dirs: set[Path] = set()
        for pat in patterns.split(","):
            found = {Path(d) for d in glob.glob(pat) if Path(d).is_dir()}
            if not found:  # a typo in one of several patterns would silently drop its seeds
                print(f"error: {name}: {pat!r} matches no directory; check the pattern", file=sys.stderr)
                return 2
            dirs |= found
        try:
            rows = collect(sorted(dirs), args.max_draws)
            if args.split:
                rows = on_split(rows, args.split)
        except ValueError as e:  # a metrics.json that is not a finished run's, or runs of different settings
            print(f"error: {name}: {e}", file=sys.stderr)
            return 2
        if not any(r.budget is not None for r in rows):
            what = "only the FP32 reference" if rows else "no finished comparison runs"
            print(f"error: {name}: {what} in {patterns} (expected {LAYOUT}); wait for the quantized runs to finish",
                  file=sys.stderr)
            return 2
        tasks.append((name, rows))
    print(standings(tasks, by_seed=args.seeds_ahead, needs=args.needs, ci=args.ci, quality=args.quality), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
