"""Pictures of an Architecture: bits per group for every site, layer by layer; a bits histogram; pruned
groups per layer. Written as PNG (matplotlib, no display needed) and logged to the run's tracker.
"""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)
import numpy as np  # noqa: E402

from supernet import Architecture, SiteKind  # noqa: E402

_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)$")
_SHORT = {"attention.self.query": "Q", "attention.self.key": "K", "attention.self.value": "V",
          "attention.output.dense": "O", "intermediate.dense": "FFN in", "output.dense": "FFN out"}


def _encoder_grid(arch: Architecture) -> tuple[np.ndarray, list[str]]:
    """[layers * site kinds, max groups] bits (NaN where a site has fewer groups), row labels."""
    rows, labels = [], []
    for name, site in arch:
        m = _LAYER.search(name)
        if site.kind is not SiteKind.ENCODER or m is None:
            continue
        rows.append(np.asarray(site.bits, dtype=float))
        labels.append(f"L{m.group(1)} {_SHORT.get(m.group(2), m.group(2))}")
    width = max((len(r) for r in rows), default=1)
    grid = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        grid[i, : len(r)] = r
    return grid, labels


def plot_architecture(arch: Architecture, path: str | Path, title: str = "") -> Path:
    """Save the three panels to `path` (PNG); returns it."""
    path = Path(path)
    grid, labels = _encoder_grid(arch)
    layers: dict[int, int] = {}
    for name, site in arch:
        m = _LAYER.search(name)
        if m is not None:
            layers[int(m.group(1))] = layers.get(int(m.group(1)), 0) + site.bits.count(0)
    hist = arch.bits_histogram("encoder")

    fig = plt.figure(figsize=(12, max(4.0, 0.22 * len(labels) + 2)))
    spec = fig.add_gridspec(2, 2, width_ratios=[3, 1])
    ax = fig.add_subplot(spec[:, 0])
    bits_values = sorted(hist)
    cmap = plt.get_cmap("viridis", max(len(bits_values), 2))
    im = ax.imshow(np.vectorize(lambda b: bits_values.index(b) if b in bits_values else np.nan)(grid),
                   aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5, vmax=len(bits_values) - 0.5)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("group")
    ax.set_title("bits per group (encoder)")
    cbar = fig.colorbar(im, ax=ax, ticks=range(len(bits_values)))
    cbar.ax.set_yticklabels([str(b) for b in bits_values])

    ax = fig.add_subplot(spec[0, 1])
    total = sum(hist.values())
    ax.bar([str(b) for b in hist], [100 * n / total for n in hist.values()], color="tab:blue")
    ax.set_xlabel("bits")
    ax.set_ylabel("% of encoder weights")

    ax = fig.add_subplot(spec[1, 1])
    ax.bar([str(k) for k in sorted(layers)], [layers[k] for k in sorted(layers)], color="tab:red")
    ax.set_xlabel("layer")
    ax.set_ylabel("pruned groups")

    s = arch.summary()
    fig.suptitle(title or f"{s['encoder_avg_bits']:.3g} bits/weight, {s['encoder_mb']:.3g} MiB encoder, "
                 f"{s['pruned_groups']} of {s['groups']} groups pruned")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
