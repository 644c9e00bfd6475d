"""Pictures of an Architecture: bits per group for every site (embeddings, encoder layer by layer, head) and the
activations' bits; an encoder bits histogram; pruned groups per layer. HAWQ-V2's (arXiv:1911.03852) Pareto
frontier and Hutchinson's convergence; the comparison of methods at equal size. Written as PNG
(matplotlib, no display needed) and logged to the run's tracker.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)
import numpy as np  # noqa: E402

from supernet import Architecture, SiteKind  # noqa: E402

if TYPE_CHECKING:
    from .comparison import Point

_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)$")
_SHORT = {"attention.self.query": "Q", "attention.self.key": "K", "attention.self.value": "V",
          "attention.output.dense": "O", "intermediate.dense": "FFN in", "output.dense": "FFN out"}


def _label(name: str, kind: SiteKind) -> str | None:
    """A heatmap row's label: `L3 Q` for an encoder matrix, the module's own name for an embedding or the head."""
    m = _LAYER.search(name)
    if kind is SiteKind.ENCODER:
        return None if m is None else f"L{m.group(1)} {_SHORT.get(m.group(2), m.group(2))}"
    return ".".join(name.split(".")[-2:]) if name.endswith(".dense") else name.split(".")[-1]  # pooler.dense


def _grid(arch: Architecture) -> tuple[np.ndarray, list[str]]:
    """[sites, max groups] bits of every site in the model's order (embeddings, encoder layers, head), NaN where a
    site has fewer groups; the row labels."""
    rows, labels = [], []
    for name, site in arch:
        label = _label(name, site.kind)
        if label is None:
            continue
        rows.append(np.asarray(site.bits, dtype=float))
        labels.append(label)
    width = max((len(r) for r in rows), default=1)
    grid = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        grid[i, : len(r)] = r
    return grid, labels


def _activations(arch: Architecture) -> str:
    """The input activations' bits: one width, or how many sites read their input at each."""
    counts = Counter(site.a_bits for _, site in arch if site.a_bits is not None)
    if not counts:
        return "activations not quantized"
    if len(counts) == 1:
        return f"{next(iter(counts))}-bit activations"
    return "activations: " + ", ".join(f"{b} bits at {n} sites" for b, n in sorted(counts.items()))


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_architecture(arch: Architecture, path: str | Path, title: str = "") -> Path:
    """Save the three panels to `path` (PNG); returns it."""
    path = Path(path)
    grid, labels = _grid(arch)
    layers: dict[int, int] = {}
    for name, site in arch:
        m = _LAYER.search(name)
        if m is not None:
            layers[int(m.group(1))] = layers.get(int(m.group(1)), 0) + site.bits.count(0)
    hist = arch.bits_histogram("encoder")

    fig = plt.figure(figsize=(12, max(4.0, 0.22 * len(labels) + 2)))
    spec = fig.add_gridspec(2, 2, width_ratios=[3, 1])
    ax = fig.add_subplot(spec[:, 0])
    bits_values = sorted({int(b) for b in grid[~np.isnan(grid)]})  # the encoder's, and the embeddings' and head's
    cmap = plt.get_cmap("viridis", max(len(bits_values), 2))
    im = ax.imshow(np.vectorize(lambda b: bits_values.index(b) if b in bits_values else np.nan, otypes=[float])(grid),
                   aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5, vmax=len(bits_values) - 0.5)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("group")
    ax.set_title("bits per group (every site; 32: FP)")
    cbar = fig.colorbar(im, ax=ax, ticks=range(len(bits_values)))
    cbar.ax.set_yticklabels([str(b) for b in bits_values])

    ax = fig.add_subplot(spec[0, 1])
    total = sum(hist.values())
    ax.bar(range(len(hist)), [100 * n / total for n in hist.values()], color="tab:blue")
    ax.set_xticks(range(len(hist)), [str(b) for b in hist])  # positions + labels: no categorical-axis log spam
    ax.set_xlabel("bits")
    ax.set_ylabel("% of encoder weights")

    ax = fig.add_subplot(spec[1, 1])
    ax.bar(range(len(layers)), [layers[k] for k in sorted(layers)], color="tab:red")
    ax.set_xticks(range(len(layers)), [str(k) for k in sorted(layers)])
    ax.set_xlabel("layer")
    ax.set_ylabel("pruned groups")

    s = arch.summary()
    fig.suptitle(title or f"{s['encoder_avg_bits']:.3g} bits/weight, {s['encoder_mb']:.3g} MiB encoder, "
                 f"{s['pruned_groups']} of {s['groups']} groups pruned, {_activations(arch)}")
    return _save(fig, path)


def plot_frontier(front: list[tuple[float, float]], chosen: tuple[float, float], path: str | Path, *,
                  budget: float | None = None, uniform: dict[int, tuple[float, float]] | None = None,
                  xlabel: str = "MiB", title: str = "") -> Path:
    """HAWQ-V2's Pareto frontier: total sensitivity against size (one (size, sensitivity) per point), the
    chosen point marked, the budget as a vertical line and uniform precisions for reference."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs, ys = zip(*front)
    ax.step(xs, ys, where="post", color="tab:blue", lw=1)
    ax.plot(xs, ys, "o", ms=3, color="tab:blue", label="Pareto frontier")
    for bits, (x, y) in sorted((uniform or {}).items()):
        ax.plot([x], [y], "s", ms=5, color="tab:gray")
        ax.annotate(f"{bits}-bit", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color="tab:gray")
    ax.plot([chosen[0]], [chosen[1]], "*", ms=14, color="tab:red", label="chosen")
    if budget is not None:
        ax.axvline(budget, ls="--", lw=1, color="tab:red", label="budget")
    if min(ys + (chosen[1],)) > 0:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("total sensitivity (sum of Omega)")
    ax.set_title(title or "HAWQ-V2 Pareto frontier")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_convergence(changes: list[float], running: list[list[float]], tol: float, path: str | Path) -> Path:
    """Hutchinson's convergence: each site's running trace estimate (scaled by its final value) and the
    relative change after each probe against the tolerance."""
    path = Path(path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    est = np.asarray(running)  # [probes, sites]
    if est.size:
        final = np.where(np.abs(est[-1]) > 0, est[-1], 1.0)
        left.plot(np.arange(1, len(est) + 1), est / final, lw=0.7, alpha=0.6)
    left.set_xlabel("probes")
    left.set_ylabel("running trace / final (per site)")
    if changes:
        right.semilogy(np.arange(2, len(changes) + 2), changes, color="tab:blue")
    right.axhline(tol, ls="--", color="tab:red", lw=1, label=f"tol {tol:g}")
    right.set_xlabel("probes")
    right.set_ylabel("relative change (largest site)")
    right.legend(fontsize=8)
    return _save(fig, path)


def pareto(points: Sequence["Point"], path: str | Path, title: str = "") -> Path:
    """The comparison: task metric (median, bars from min to max over seeds) against encoder MiB, one line
    per method, FP32 as a horizontal line."""
    from .comparison import Kind  # the comparison module draws with this one

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {Kind.searched: ("tab:red", "o"), Kind.hawq: ("tab:blue", "s"), Kind.uniform: ("tab:gray", "^")}
    name = next((p.metric_name for p in points), "metric")
    for method, (color, marker) in styles.items():
        pts = sorted((p for p in points if p.method is method), key=lambda p: p.encoder_mb)
        if not pts:
            continue
        x = [p.encoder_mb for p in pts]
        y = [p.median for p in pts]
        err = [[p.median - p.low for p in pts], [p.high - p.median for p in pts]]
        ax.errorbar(x, y, yerr=err, color=color, marker=marker, ms=5, lw=1.2, capsize=3, label=method.value)
        # one label per point: uniform QAT at 1.5 and 2 bits is the same model, so "2b, 1.5b", not two overprinted
        labels: dict[tuple[float, float], list[str]] = {}
        for p in pts:
            labels.setdefault((p.encoder_mb, p.median), []).append(f"{p.budget:g}b")
        for xy, names in labels.items():
            ax.annotate(", ".join(names), xy, textcoords="offset points", xytext=(4, -10), fontsize=7, color=color)
    fp = next((p for p in points if p.method is Kind.fp32), None)
    if fp is not None:
        ax.axhline(fp.median, ls="--", lw=1, color="black", label=f"FP32 ({fp.median:.2f})")
    ax.set_xlabel("encoder weights (MiB, exact)")
    ax.set_ylabel(f"dev {name} (%)")
    ax.set_title(title or "accuracy at equal size", fontsize=8)
    ax.legend(fontsize=8)
    return _save(fig, path)
