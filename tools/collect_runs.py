"""Summarise run directories (their metrics.json) as a Markdown table, for BENCHMARKS.md.

    python tools/collect_runs.py runs/bench/fp [more dirs ...]

Every directory below the given ones that holds a metrics.json is one row: stage, task, every split's
metrics, training steps, wall time and throughput. Nothing is typed by hand.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(roots: list[Path]) -> list[dict]:
    found = []
    for root in roots:
        for path in sorted(root.rglob("metrics.json")):
            found.append({"dir": str(path.parent), **json.loads(path.read_text())})
    return found


def fmt_metrics(splits: dict) -> str:
    parts = []
    for split, result in splits.items():
        vals = ", ".join(f"{k} {v:.2f}" for k, v in result.get("metrics", {}).items())
        parts.append(f"{split}: {vals}")
    return "; ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", nargs="+", type=Path)
    args = p.parse_args()
    print("| stage | task | model | encoder bits/weight | encoder MiB | pruned groups | dev metrics (%) | steps | epochs "
          "| wall (min) | train examples/s | run dir |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows(args.roots):
        train = r.get("train", {})
        arch = r.get("architecture") or {}
        bits = f"{arch['encoder_avg_bits']:.3f}" if arch else "32 (FP)"
        mb = f"{arch['encoder_mb']:.3f}" if arch else ""
        print(f"| {r.get('stage')} | {r.get('task')} | {'/'.join(Path(str(r.get('model', ''))).parts[-2:])} | {bits} | {mb} "
              f"| {arch.get('pruned_groups', '')} | {fmt_metrics(r.get('splits', {}))} "
              f"| {train.get('steps', '')} | {train.get('epochs', 0):.2f} | {train.get('wall_s', 0) / 60:.1f} "
              f"| {train.get('examples_per_s', 0):.1f} | `{r['dir']}` |")


if __name__ == "__main__":
    main()
