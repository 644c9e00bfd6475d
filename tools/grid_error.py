"""How much squared error each weight grid leaves on a real model's weights, at each bit-width.

Converts the model's encoder Linears to supernet sites (the app's grouping, default 128 groups per
matrix) once per grid, initialises every candidate's step as the search and QAT do (space.init, MSE by
default), and prints, as a markdown table, sum ||Q_b(W_g) - W_g||^2 over all encoder groups divided by
sum ||W_g||^2 (the energy pruning would remove), for the symmetric and the mid-rise grid.

    python tools/grid_error.py ../shared/assets/models/all-MiniLM-L6-v2 --bits 1 2 3 4 8
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoModel

from supernet import QuantMode, SearchSpace, SiteKind, sites, to_supernet
from supernet.quantizers import MIDRISE_BITS, group_errors


def relative_errors(path: str, mode: QuantMode, bits: list[int], groups: int) -> dict[int, float]:
    """bit-width -> encoder-wide squared quantization error over the weights' energy, on grid `mode`."""
    usable = [b for b in bits if b != MIDRISE_BITS or mode is QuantMode.MIDRISE]
    model = AutoModel.from_pretrained(path)
    to_supernet(model, SearchSpace(w_bits=usable, w_grid=mode, groups=groups, a_bits=[32], embedding_bits=[32]))
    err = torch.zeros(len(usable), dtype=torch.float64)
    energy = 0.0
    for _, site in sites(model):
        if site.kind is not SiteKind.ENCODER:
            continue
        grouped = site.to_groups(site.weight.detach()).double()
        err += group_errors(grouped, site.wq.step.double(), usable, mode=mode).sum(0)
        energy += grouped.pow(2).sum().item()
    return {b: e / energy for b, e in zip(usable, err.tolist())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a BERT checkpoint folder (or hub name)")
    ap.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    ap.add_argument("--groups", type=int, default=128)
    args = ap.parse_args()
    sym = relative_errors(args.model, QuantMode.SYMMETRIC, args.bits, args.groups)
    mid = relative_errors(args.model, QuantMode.MIDRISE, args.bits, args.groups)
    print("| bits | symmetric | mid-rise | mid-rise / symmetric |")
    print("|---|---|---|---|")
    for b in args.bits:
        s = sym.get(b)
        ratio = f"{mid[b] / s:.3f}" if s else "-"
        print(f"| {b} | {s:.4f} | {mid[b]:.4f} | {ratio} |" if s else f"| {b} | - (no grid) | {mid[b]:.4f} | - |")


if __name__ == "__main__":
    main()
