"""Did the search decide? One row per search run directory, from what the search stage wrote.

A search that ends with every group's candidates near uniform hands the architecture to derivation's
repair and fill, not to what it learned. For each `search/` run directory (its config.yaml, alphas.json,
metrics.json, and `../qat/metrics.json` when a QAT of it sits beside it, as stage=compare and
stage=pipeline lay them out) this prints, as a markdown table: the logit optimiser and temperatures, the
median probability of each searched group's top candidate and the share of groups at >= 0.9, the
argmax architecture's size against the budget, how derivation (search.derivation) moved groups (groups changed
and one-candidate steps; runs from before the report counted groups show the steps alone) and how much probability
that cost (the sum over moved groups of p(argmax) - p(chosen)), pruned groups, and the
metric before and after QAT. `--choices` adds the start (search.alpha_init), the curvature weight and the
number of encoder groups at each bit-width of the derived architecture.

    python tools/search_decidedness.py runs/bench/compare/mrpc/b3/s42/search runs/bench/compare/mrpc_v2/b3/s42/search
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from omegaconf import OmegaConf

from search.derive import DECIDED, decidedness
from supernet import Architecture, SiteKind


def choices(run: Path, cfg: dict) -> str:
    """The start, the curvature weight and "groups at b1 / b2 / ... bits: n1 / n2 / ..." of the derived architecture."""
    counts: Counter[int] = Counter()
    for _, site in Architecture.load(run / "architecture.json"):
        if site.kind is SiteKind.ENCODER:
            counts.update(site.bits)
    bits = sorted(counts)
    return (f" {cfg.get('alpha_init', 'equal')} | {cfg.get('curvature_weight', 0.0):g} | "
            f"{' / '.join(map(str, bits))}: {' / '.join(str(counts[b]) for b in bits)} |")


def row(run: Path, with_choices: bool = False) -> str:
    for name in ("config.yaml", "alphas.json", "metrics.json"):
        if not (run / name).is_file():
            raise SystemExit(f"{run / name} is missing: give search run directories (stage=search or a compare cell's search/)")
    cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))["search"]
    alphas = json.loads((run / "alphas.json").read_text())
    probs = {name: (tuple(a["bits"]), torch.tensor(a["probs"], dtype=torch.float64)) for name, a in alphas.items()}
    median, share = decidedness(probs)  # what the search's own derive report says
    searched = sum(len(p) for bits, p in probs.values() if len(bits) > 1)
    metrics = json.loads((run / "metrics.json").read_text())
    d, arch, main = metrics["derive"], metrics["architecture"], metrics["main_metric"]
    qat_path = run.parent / "qat" / "metrics.json"
    qat = f"{json.loads(qat_path.read_text())['main_metric']['value']:.2f}" if qat_path.is_file() else ""
    return (f"| `{run}` | {cfg['arch_optimizer']} {cfg['arch_lr']:g} | {cfg['tau_start']:g} -> {cfg['tau_end']:g} | "
            f"{cfg['epochs']:g} | {median:.2f} | {100 * share:.0f}% | "
            f"{d['argmax']:.3f} / {d['target']:g} {d['unit']} | {cfg.get('derivation', 'greedy')}: "
            f"{'' if d.get('moved_groups') is None else str(d['moved_groups']) + ' in '}"
            f"{d['upgraded_groups'] + d['downgraded_groups']} steps, {d['probability_lost']:.1f} | "
            f"{arch['pruned_groups']} of {searched} | {main['name']} {main['value']:.2f} | {qat} |"
            + (choices(run, cfg) if with_choices else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="search run directories")
    p.add_argument("--choices", action="store_true", help="add the start, curvature weight and groups per bit-width")
    args = p.parse_args()
    extra = " start | curvature weight | encoder groups per bit-width |" if args.choices else ""
    lines = []
    for run in args.runs:  # every row before the header: a bad run leaves no half-printed table
        try:
            lines.append(row(run, args.choices))
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # a truncated or foreign json file
            raise SystemExit(f"error: {run} is not a finished search run ({type(e).__name__}: {e}); "
                             f"re-run it or leave it out")
    print(f"| search run | logits | temperature | epochs | median top probability | groups decided (>= {DECIDED}) | "
          f"argmax / budget | derivation: groups moved in candidate steps, probability lost | pruned groups | derived, before QAT | after QAT |{extra}")
    print("|---" * (11 + 3 * args.choices) + "|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
