"""Do two allocations agree? Signal or noise in the searches' choices, from their architecture.json files.

Searches run with other seeds (or HAWQ-V2 and a search) at one budget: if their choices were noise, two of
them would agree on a group's bits no more often than their per-site bit histograms make likely. For each
pair of architectures this prints, over the encoder groups: the share of groups with the same bits, the
share expected from each site's own histograms (chance), the excess, and the correlation of the sites' mean
bits (does the allocation over layers and matrices repeat?). With `--sites`, a second table gives every
site's mean bits and pruned share in each architecture.

    python tools/arch_agreement.py runs/bench/compare/sst2_s4[234]_a/b2/s*/search/architecture.json --sites
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

from supernet import Architecture, SiteKind


def encoder_bits(arch: Architecture) -> dict[str, np.ndarray]:
    return {name: np.array(site.bits) for name, site in arch if site.kind is SiteKind.ENCODER}


def agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, float, float]:
    """(share of groups with the same bits, the share expected by chance within each site, the correlation
    of the per-site mean bits), over the groups of the sites both have, each group weighing the same."""
    names = sorted(set(a) & set(b))
    if not names or any(len(a[n]) != len(b[n]) for n in names):
        raise ValueError("the architectures share no encoder site with the same groups: compare allocations "
                         "of one model and space")
    same = chance = 0.0
    for n in names:
        values = np.union1d(a[n], b[n])
        same += float((a[n] == b[n]).sum())
        chance += len(a[n]) * sum(float((a[n] == v).mean() * (b[n] == v).mean()) for v in values)
    total = sum(len(a[n]) for n in names)
    means = np.array([[a[n].mean(), b[n].mean()] for n in names])
    r = float(np.corrcoef(means.T)[0, 1]) if means.std(axis=0).min() > 0 else float("nan")
    return same / total, chance / total, r


def _short(path: Path, others: list[Path]) -> str:
    """The path without the parts every argument shares, so a row names what differs."""
    parts = [p.parts for p in others]
    head = 0
    while all(len(p) > head and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) > tail + head and p[-1 - tail] == parts[0][-1 - tail] for p in parts):
        tail += 1
    return "/".join(path.parts[head:len(path.parts) - tail]) or str(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("architectures", nargs="+", type=Path, help="two or more architecture.json files")
    p.add_argument("--sites", action="store_true", help="also every site's mean bits and pruned share")
    args = p.parse_args()
    if len(args.architectures) < 2:
        raise SystemExit("error: give two or more architecture.json files to compare")
    try:
        archs = {path: encoder_bits(Architecture.load(path)) for path in args.architectures}
        rows = [(x, y, *agreement(archs[x], archs[y])) for x, y in itertools.combinations(args.architectures, 2)]
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    name = {path: _short(path, args.architectures) for path in args.architectures}
    print("| architecture | other | same bits | chance | excess | site mean bits r |")
    print("|---|---|---|---|---|---|")
    for x, y, same, chance, r in rows:
        print(f"| {name[x]} | {name[y]} | {same:.3f} | {chance:.3f} | {same - chance:+.3f} | {r:+.2f} |")
    if args.sites:
        print()
        print("| site | " + " | ".join(f"{name[a]}: mean bits (pruned)" for a in args.architectures) + " |")
        print("|---|" + "---|" * len(args.architectures))
        for site in sorted(set.intersection(*(set(b) for b in archs.values())), key=_site_order):
            cells = [f"{archs[a][site].mean():.2f} ({100 * (archs[a][site] == 0).mean():.0f}%)" for a in args.architectures]
            print(f"| {site} | " + " | ".join(cells) + " |")


def _site_order(name: str) -> tuple[int, str]:
    """Layer by layer (layer 10 after layer 9), then by name."""
    layer = [int(part) for part in name.split(".") if part.isdigit()]
    return (layer[0] if layer else -1, name)


if __name__ == "__main__":
    main()
