"""Put a search variant's runs beside another comparison's baselines, without training the baselines again.

    python tools/graft_searched.py BASE VARIANT OUT

BASE is a comparison directory (`stage=compare`, e.g. from tools/bench_compare.sh) with FP32, HAWQ-V2 and
uniform QAT; VARIANT one of the same checkpoint and seeds run with other search settings and
`compare.methods=[searched]`. OUT gets BASE's `fp32/`, HAWQ-V2 and uniform steps and VARIANT's `search/` and
`qat/` steps (and its QAT draws `qat.draw<d>/`, if any) of every cell (budget and seed) VARIANT has, as hard
links (no data copied), so that tools/summarize_compare.py and tools/standings.py compare the variant with the
very same baseline runs.
BASE's HAWQ-V2 was matched to BASE's searched size: the report prints both sizes per cell, since a variant
that lands elsewhere is no longer at equal size. OUT is replaced if it exists.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from search.comparison import Kind, method_of
from search.rundir import replace_dir, temp_beside


def _searched(step: str) -> bool:
    """The search and the QAT of its architecture, every draw: what OUT takes from VARIANT and never from BASE."""
    return step == "search" or method_of(step)[0] is Kind.searched


def _link_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=os.link)


def _encoder_bits(step: Path) -> float | None:
    metrics = step / "metrics.json"
    return json.loads(metrics.read_text()).get("architecture", {}).get("encoder_avg_bits") if metrics.is_file() else None


def graft(base: Path, variant: Path, out: Path) -> list[str]:
    """Build OUT; returns one line per grafted cell. ValueError names what is missing."""
    for given, name in ((base, "BASE"), (variant, "VARIANT")):
        if out.resolve() == given.resolve() or given.resolve().is_relative_to(out.resolve()):
            raise ValueError(f"OUT {out} would replace {name} {given}, whose runs it is built from: give a new OUT")
    if not (base / "fp32" / "metrics.json").is_file():
        raise ValueError(f"{base} has no finished fp32/ run: pass a comparison directory with the baselines")
    cells = sorted(p.parent.parent.relative_to(variant) for p in variant.glob("b*/s*/qat/metrics.json"))
    if not cells:
        raise ValueError(f"{variant} has no finished searched run (b<budget>/s<seed>/qat/metrics.json)")
    missing = [str(c) for c in cells if not (base / c).is_dir()]
    if missing:
        raise ValueError(f"{base} has no cell {', '.join(missing)} of {variant}: run its baselines at those budgets and seeds")
    tmp = temp_beside(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        lines = _fill(base, variant, tmp, cells)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-built tree left behind
        raise
    replace_dir(tmp, out)
    return lines


def _fill(base: Path, variant: Path, tmp: Path, cells: list[Path]) -> list[str]:
    _link_tree(base / "fp32", tmp / "fp32")
    lines = []
    for cell in cells:
        for step in sorted((base / cell).iterdir()):
            if step.is_dir() and not _searched(step.name):
                _link_tree(step, tmp / cell / step.name)
            elif step.is_file():  # uniform<bits>.json, the uniform baseline's architecture
                os.link(step, tmp / cell / step.name)
        for step in sorted((variant / cell).iterdir()):
            if step.is_dir() and _searched(step.name):
                _link_tree(step, tmp / cell / step.name)
        lines.append(f"{cell}: searched {_encoder_bits(variant / cell / 'qat')} encoder bits/weight, "
                     f"HAWQ-V2 {_encoder_bits(base / cell / 'hawq_qat')} (matched to {base.name}'s search)")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", type=Path)
    p.add_argument("variant", type=Path)
    p.add_argument("out", type=Path)
    args = p.parse_args()
    try:
        lines = graft(args.base, args.variant, args.out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
