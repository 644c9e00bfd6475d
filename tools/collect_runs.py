"""Summarise run directories (their metrics.json) as a Markdown table, for BENCHMARKS.md.

    python tools/collect_runs.py runs/bench/fp [more dirs ...]
    python tools/collect_runs.py --exports runs/bench/export      # the size accounting of stage=export runs

Every directory below the given ones that holds a metrics.json is one row: stage, task, every split's
metrics, training steps, wall time and throughput (with --exports: bytes on disk against the exact size,
and the verification against the QAT model). Nothing is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rows(roots: list[Path]) -> list[dict]:
    """Every metrics.json below `roots`; ValueError names a missing root or a file that is not a run's summary."""
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        raise ValueError(f"no such directory: {', '.join(missing)}")
    found = []
    for root in roots:
        for path in sorted(root.rglob("metrics.json")):
            try:
                m = json.loads(path.read_text())
            except ValueError as e:
                raise ValueError(f"{path} is not valid JSON ({e}); re-run that step or move the file out of the way") from e
            if not isinstance(m, dict):
                raise ValueError(f"{path} is not a run's metrics.json; re-run that step or move the file out of the way")
            found.append({"dir": str(path.parent), **m})
    return found


def fmt_metrics(splits: dict) -> str:
    parts = []
    for split, result in splits.items():
        vals = ", ".join(f"{k} {v:.2f}" for k, v in result.get("metrics", {}).items())
        parts.append(f"{split}: {vals}")
    return "; ".join(parts)


def export_table(found: list[dict]) -> None:
    mib = 2**20
    print("| source run | encoder bits/weight | pruned groups | exact total (MiB) | model.safetensors (MiB) | header (B) "
          "| padding (B) | act. steps (B) | unaccounted (B) | disk vs exact | folder incl. tokenizer (MiB) | FP32 (MiB) "
          "| QAT fake-quant file (MiB) | max logit diff vs QAT | identical labels | dev metric |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in found:
        if r.get("stage") != "export":
            continue
        s, a = r["size"], r["architecture"]
        v = list((r.get("verify") or {}).values())
        diff = f"{max(x['max_abs_logit_diff'] for x in v):.1e}" if v else "not verified"
        same = (f"{all(x['identical_predictions'] for x in v)} ({sum(x['examples'] for x in v)} ex.)") if v else ""
        m = r["main_metric"]
        print(f"| `{'/'.join(Path(r['model']).parts[-4:-1])}` | {a['encoder_avg_bits']:.3f} | {a['pruned_groups']} "
              f"| {s['exact_bytes'] / mib:.3f} | {s['file_bytes'] / mib:.3f} | {s['header_bytes']} | {s['padding_bytes']:.1f} "
              f"| {s['act_scale_bytes']} | {s['unaccounted_bytes']:.0f} | {100 * s['overhead']:+.2f}% "
              f"| {(s['folder_bytes']) / mib:.3f} | {s['fp32_bytes'] / mib:.2f} | {s['qat_file_bytes'] / mib:.2f} "
              f"| {diff} | {same} | {m['name']} {m['value']:.2f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", nargs="+", type=Path)
    p.add_argument("--exports", action="store_true", help="the size table of stage=export runs")
    args = p.parse_args()
    try:
        found = rows(args.roots)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.exports:
        found = [r for r in found if r.get("stage") == "export"]
    if not found:  # a header alone reads as "nothing went wrong"
        what = "stage=export runs" if args.exports else "runs (metrics.json)"
        print(f"error: no {what} below {', '.join(map(str, args.roots))}", file=sys.stderr)
        return 2
    if args.exports:
        export_table(found)
        return 0
    print("| stage | task | model | encoder bits/weight | encoder MiB | pruned groups | dev metrics (%) | steps | epochs "
          "| wall (min) | train examples/s | run dir |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in found:
        train = r.get("train", {})
        arch = r.get("architecture") or {}
        bits = f"{arch['encoder_avg_bits']:.3f}" if arch else "32 (FP)"
        mb = f"{arch['encoder_mb']:.3f}" if arch else ""
        print(f"| {r.get('stage')} | {r.get('task')} | {'/'.join(Path(str(r.get('model', ''))).parts[-2:])} | {bits} | {mb} "
              f"| {arch.get('pruned_groups', '')} | {fmt_metrics(r.get('splits', {}))} "
              f"| {train.get('steps', '')} | {train.get('epochs', 0):.2f} | {train.get('wall_s', 0) / 60:.1f} "
              f"| {train.get('examples_per_s', 0):.1f} | `{r['dir']}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
