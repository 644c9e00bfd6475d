"""Did the search decide? One row per search run directory, from what the search stage wrote.

A search that ends with every group's candidates near uniform hands the architecture to derivation's
repair and fill, not to what it learned. For each `search/` run directory (its config.yaml, alphas.json,
metrics.json, and `../qat/metrics.json` when a QAT of it sits beside it, as stage=compare and
stage=pipeline lay them out) this prints, as a markdown table: the logit optimiser and temperatures, the
median probability of each searched group's top candidate and the share of groups at >= 0.9, the
argmax architecture's size against the budget, how many groups derivation moved, pruned groups, and the
metric before and after QAT.

    python tools/search_decidedness.py runs/bench/compare/mrpc/b3/s42/search runs/bench/compare/mrpc_v2/b3/s42/search
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

DECIDED = 0.9  # as search/derive.py


def row(run: Path) -> str:
    for name in ("config.yaml", "alphas.json", "metrics.json"):
        if not (run / name).is_file():
            raise SystemExit(f"{run / name} is missing: give search run directories (stage=search or a compare cell's search/)")
    cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))["search"]
    alphas = json.loads((run / "alphas.json").read_text())
    tops = np.concatenate([np.max(np.array(a["probs"]), 1) for a in alphas.values() if len(a["bits"]) > 1])
    metrics = json.loads((run / "metrics.json").read_text())
    d, arch, main = metrics["derive"], metrics["architecture"], metrics["main_metric"]
    qat_path = run.parent / "qat" / "metrics.json"
    qat = f"{json.loads(qat_path.read_text())['main_metric']['value']:.2f}" if qat_path.is_file() else ""
    return (f"| `{run}` | {cfg['arch_optimizer']} {cfg['arch_lr']:g} | {cfg['tau_start']:g} -> {cfg['tau_end']:g} | "
            f"{cfg['epochs']:g} | {np.median(tops):.2f} | {100 * np.mean(tops >= DECIDED):.0f}% | "
            f"{d['argmax']:.3f} / {d['target']:g} {d['unit']} | {d['upgraded_groups'] + d['downgraded_groups']} | "
            f"{arch['pruned_groups']} of {len(tops)} | {main['name']} {main['value']:.2f} | {qat} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="search run directories")
    args = p.parse_args()
    print("| search run | logits | temperature | epochs | median top probability | groups decided (>= 0.9) | "
          "argmax / budget | groups moved by derivation | pruned groups | derived, before QAT | after QAT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        print(row(run))


if __name__ == "__main__":
    main()
