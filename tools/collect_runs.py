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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", nargs="+", type=Path)
    p.add_argument("--exports", action="store_true", help="the size table of stage=export runs")
    args = p.parse_args()
    if args.exports:
        export_table(rows(args.roots))
        return
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
