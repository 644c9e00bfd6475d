"""HAWQ-V2 (Dong et al., arXiv:1911.03852): Hessian-aware sensitivities of every group of a supernet.

The sensitivity of group g at b bits is Omega_g(b) = (Tr(H_g) / n_g) * ||Q_b(W_g) - W_g||^2: the
average curvature of the loss along the group's weights times the squared error of the very quantizer the
supernet uses, at its initial LSQ step. A pruned group (0 bits) loses ||W_g||^2, a float one nothing.
Q-BERT's variant (arXiv:1909.05840) puts its site's top Hessian eigenvalue in place of Tr(H_g) / n_g.
With `trace_level=site` the site's average trace Tr(H_site) / n_site (HAWQ-V2's per-layer trace: the sum
of its groups' estimates, far less noisy than one group's) replaces Tr(H_g) / n_g for all its groups, so
the groups of a matrix differ only in their quantization errors. A curvature estimate that is not positive
counts as a thousandth of the median positive one (`FLOOR`): counted as zero, every such group would be
free to prune, and a model whose estimates are all noise would be allocated far below its budget. A site
whose whole trace is negative is still nearly free to prune that way; `NegativeCurvature.absolute` takes the
magnitude of every estimate instead (curvature of either sign makes a large perturbation costly).

The curvature is that of the floating-point model (a straight-through quantizer has no useful second
derivative): Hessians are taken on the Hugging Face model before conversion, whose weights are the very
Parameters the sites wrap, cut into groups the way the sites cut them. The allocation under a budget is
`search.knapsack`; this module turns a supernet, its curvature and a budget into that knapsack.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from supernet import Architecture, MixedEmbedding, MixedLinear, sites
from supernet.quantizers import QuantMode, group_errors

from .bilevel import task_loss
from .budget import Budget
from .config import NegativeCurvature, Sensitivity, TraceLevel
from .hessian import GroupView, Hessian, hutchinson, top_eigenvalues
from .knapsack import Knapsack

__all__ = ["Curvature", "FLOOR", "curvature_floor", "group_view", "measure_curvature", "quantization_errors", "sensitivities", "build_knapsack",
           "to_architecture"]

log = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]


def group_view(site: MixedLinear | MixedEmbedding) -> GroupView:
    """How `site` cuts a tensor shaped like its weight into its groups, [G, n]."""
    return site.to_groups


@dataclass
class Curvature:
    """Per site, one estimate per group: its Hessian trace (`trace`) or the site's top eigenvalue repeated
    (`top_eigenvalue`), with standard errors (trace only); how they were obtained."""

    kind: Sensitivity
    estimate: dict[str, list[float]]
    stderr: dict[str, list[float | None]] = field(default_factory=dict)  # None: a single probe
    probes: int = 0  # Hutchinson probes, or the most power iterations a site took
    seconds: float = 0.0
    changes: list[float] = field(default_factory=list)  # relative change after each probe (trace)
    running: list[list[float]] = field(default_factory=list)  # [probes][sites] running site traces (trace)

    def per_weight(self, name: str, group_numel: int, level: TraceLevel = TraceLevel.group) -> torch.Tensor:
        """[G] the factor of ||Q(W_g) - W_g||^2 in Omega: trace / n_g, or the top eigenvalue itself. At
        `TraceLevel.site` every group gets the site's trace (the sum of its groups') / the site's size."""
        est = torch.tensor(self.estimate[name], dtype=torch.float64)
        if self.kind is not Sensitivity.trace:
            return est
        if level is TraceLevel.site:
            return torch.full_like(est, float(est.sum()) / (group_numel * len(est)))
        return est / group_numel

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "probes": self.probes, "seconds": self.seconds,
                "sites": {n: {"estimate": e, **({"stderr": self.stderr[n]} if n in self.stderr else {})}
                          for n, e in self.estimate.items()},
                "changes": self.changes, "running": self.running}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Curvature":
        site_d = d["sites"]
        return cls(Sensitivity(d["kind"]), {n: s["estimate"] for n, s in site_d.items()},
                   {n: s["stderr"] for n, s in site_d.items() if "stderr" in s}, int(d["probes"]),
                   float(d["seconds"]), list(d.get("changes", [])), list(d.get("running", [])))


def _fp_weights(fp_model: nn.Module, supernet: nn.Module) -> tuple[list[str], list[nn.Parameter], list[GroupView]]:
    """The FP model's weight of every site of `supernet` (same module names), and the site's grouping."""
    names, params, views = [], [], []
    for name, site in sites(supernet):
        weight = fp_model.get_submodule(name).weight
        if weight.shape != site.weight.shape:
            raise ValueError(f"{name}: the FP model's weight is {tuple(weight.shape)}, the site's {tuple(site.weight.shape)}")
        names.append(name)
        params.append(weight)
        views.append(group_view(site))
    return names, params, views


def measure_curvature(fp_model: nn.Module, supernet: nn.Module, batches: Iterable[Batch], kind: Sensitivity, *,
                      max_probes: int, tol: float, seed: int, progress: bool = False,
                      loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = task_loss) -> Curvature:
    """The curvature of `fp_model`'s loss (mean over `batches`) at every site of `supernet`.

    `fp_model` is an unconverted copy of the supernet's model: it is put in eval mode, with eager attention
    (fused attention kernels have no double backward) and gradients only for the sites' weights.
    """
    names, params, views = _fp_weights(fp_model, supernet)
    fp_model.eval()
    if hasattr(fp_model, "set_attn_implementation"):
        fp_model.set_attn_implementation("eager")
    wanted = {id(p) for p in params}
    for p in fp_model.parameters():
        p.requires_grad_(id(p) in wanted)
    device = params[0].device
    losses = [lambda b={k: v.to(device) for k, v in batch.items()}: loss_fn(fp_model, b) for batch in batches]
    start = time.perf_counter()
    hessian = Hessian(losses, params)
    if kind is Sensitivity.trace:
        est = hutchinson(hessian, views, max_probes=max_probes, tol=tol, seed=seed, progress=progress)
        stderr = {n: [None if math.isnan(x) else x for x in s.tolist()] for n, s in zip(names, est.stderr())}  # JSON has no NaN
        curvature = Curvature(kind, {n: m.tolist() for n, m in zip(names, est.mean())}, stderr, est.probes,
                              changes=est.changes, running=est.running().tolist())
    else:
        eig = top_eigenvalues(hessian, max_iter=max_probes, tol=tol, seed=seed, progress=progress)
        curvature = Curvature(kind, {n: [value] * view(p).shape[0] for n, p, view, (value, _) in zip(names, params, views, eig)},
                              probes=max(it for _, it in eig))
    curvature.seconds = time.perf_counter() - start
    log.info("%s of %d sites over %d batches: %d %s in %.1fs", kind.value, len(names), len(losses), curvature.probes,
             "probes" if kind is Sensitivity.trace else "power iterations (most of a site)", curvature.seconds)
    return curvature


def quantization_errors(grouped: torch.Tensor, steps: torch.Tensor, bits: Sequence[int],
                        mode: QuantMode = QuantMode.SYMMETRIC) -> torch.Tensor:
    """[G, K] ||Q_b(W_g) - W_g||^2 of a weight's groups `grouped` [G, n] at each candidate, with the
    quantizer's grid and steps [G, K] (unused by the zero and float candidates); in float64, on the CPU."""
    return group_errors(grouped.detach().double(), steps.detach().double(), bits, mode=mode).cpu()


FLOOR = 1e-3  # a non-positive curvature counts as this fraction of the median positive one


def sensitivities(per_weight: torch.Tensor, errors: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """[G, K] Omega = curvature per weight [G] * errors [G, K]. A curvature estimate below `floor` (a
    negative one is noise, or a saddle: a fine-tuned model is not exactly at a minimum) counts as `floor`:
    nearly no loss to second order, but not none, so that among choices of equal estimated loss the one
    with the smaller quantization error wins instead of the budget being left unused."""
    return per_weight.double().clamp_min(floor)[:, None] * errors.double()


def curvature_floor(per_weight: Sequence[torch.Tensor]) -> float:
    """FLOOR x the median positive curvature per weight (1.0 when none is positive: then only the
    quantization errors rank the choices)."""
    positive = torch.cat([c[c > 0] for c in per_weight])
    return FLOOR * float(positive.median()) if len(positive) else 1.0


def build_knapsack(supernet: nn.Module, template: Architecture, curvature: Curvature, budget: Budget,
                   level: TraceLevel = TraceLevel.group,
                   negative: NegativeCurvature = NegativeCurvature.floor) -> Knapsack:
    """The knapsack of `supernet`'s groups: Omega per candidate (with the sites' initial steps and the
    curvature at `level`, its magnitude with `NegativeCurvature.absolute`) and the budget's exact prices
    (`Budget.group_prices`, the cost model), per site in sorted candidate order."""
    candidates = {name: site.wq.cands.bits for name, site in sites(supernet)}
    prices, constant = budget.group_prices(template, candidates)
    per_weight = {name: curvature.per_weight(name, site.wq.group_numel, level) for name, site in sites(supernet)}
    if negative is NegativeCurvature.absolute:
        per_weight = {name: c.abs() for name, c in per_weight.items()}
    floor = curvature_floor(list(per_weight.values()))
    names, bits, values, costs = [], [], [], []
    for name, site in sites(supernet):
        cands = site.wq.cands.bits
        errors = quantization_errors(group_view(site)(site.weight), site.wq.step, cands, site.wq.cands.mode)  # [G, K]
        omega = sensitivities(per_weight[name], errors, floor)
        sorted_bits, price = prices[name]
        order = [cands.index(b) for b in sorted_bits]  # the prices' candidate order
        names.append(name)
        bits.append(tuple(sorted_bits))
        values.append(omega[:, order].numpy())
        costs.append(price.numpy())
    return Knapsack(tuple(names), tuple(bits), tuple(values), tuple(costs), float(constant))


def to_architecture(template: Architecture, knapsack: Knapsack, choice: Sequence[np.ndarray]) -> Architecture:
    """`template` with every group at its chosen bits (activation bits and all else as in the template)."""
    chosen = {n: tuple(int(b[i]) for i in c) for n, b, c in zip(knapsack.names, knapsack.bits, choice)}
    return dataclasses.replace(template, sites=tuple((n, dataclasses.replace(s, bits=chosen[n])) for n, s in template))
