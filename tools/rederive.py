"""Derive a finished search again, with another rule, without searching again.

A search writes its groups' candidate probabilities (alphas.json), its derived architecture (architecture.json)
and its budget (metrics.json). This reads them, rebuilds the argmax architecture, and derives it again within the
same budget with `--derivation greedy|exact|site` (as `search.derivation`), so that derivation rules can be
compared on the same searches: the written architecture.json goes to `stage=qat qat.architecture=...` or
`stage=eval eval.architecture=...`. One line per search: the rule, the size it reached and how far it moved.

    python tools/rederive.py runs/bench/compare/sst2_lowg18_s42/b2/s42/search --derivation site --out site.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from search.budget import Budget
from search.derive import at_argmax, derive_from
from supernet import Architecture


def load_search(path: Path) -> tuple[Architecture, dict[str, tuple[tuple[int, ...], torch.Tensor]], Budget | None]:
    """(architecture.json, alphas.json's probabilities, the budget of metrics.json) of a search directory."""
    files = {name: path / name for name in ("architecture.json", "alphas.json", "metrics.json")}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise ValueError(f"{path} is not a finished search directory: no {', '.join(missing)}")
    try:
        alphas = json.loads(files["alphas.json"].read_text())
        probs = {name: (tuple(int(b) for b in v["bits"]), torch.tensor(v["probs"], dtype=torch.float64))
                 for name, v in alphas.items()}
        budget = json.loads(files["metrics.json"].read_text()).get("budget")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: a malformed alphas.json or metrics.json ({e})") from e
    if budget:
        budget = Budget.from_args(budget["target"] if budget["unit"] == "avg_bits" else None,
                                  budget["target"] if budget["unit"] == "mb" else None, budget["scope"])
    return Architecture.load(files["architecture.json"]), probs, budget or None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("search", type=Path, help="a finished search's run directory")
    ap.add_argument("--derivation", choices=["greedy", "exact", "site"], default="site")
    ap.add_argument("--out", type=Path, required=True, help="where to write the derived architecture.json")
    args = ap.parse_args(argv)
    try:
        template, probs, budget = load_search(args.search)
        arch, report = derive_from(at_argmax(template, probs), probs, budget, exact=args.derivation == "exact",
                                   site=args.derivation == "site")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    arch.save(args.out)
    reached = "" if report.final is None else f" -> {report.final:.4g} {report.unit} (budget {report.target:g})"
    print(f"{args.search}: {args.derivation}{reached}, {report.moved_groups} groups moved from the argmax, "
          f"{arch.pruned_groups()} pruned; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
