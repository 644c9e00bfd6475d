"""Hessian-vector products over a parameter subset, Hutchinson's trace estimator and power iteration.

Written after PyHessian (Yao et al., arXiv:1912.07145), as HAWQ-V2 (arXiv:1911.03852) uses it: H v by
double backprop (differentiate the gradient's dot product with v), and the trace of each block of H as
E[v^T H v] over Rademacher probes v. One product per probe, with v drawn over every parameter at once,
gives every group's v_g^T (H v)_g: summed over a group's elements it is an unbiased estimate of the trace
of the group's diagonal block (the cross terms have zero mean), so all groups of all sites share the
probes. `top_eigenvalues` runs power iteration on each parameter's diagonal block instead (Q-BERT,
arXiv:1909.05840).

The loss must be twice differentiable in the parameters: take it on the floating-point model (a
straight-through quantizer's second derivative is zero almost everywhere). Device and dtype come from
the parameters.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from search.progress import progress_bar

__all__ = ["Hessian", "TraceEstimate", "hutchinson", "rademacher", "top_eigenvalues"]

log = logging.getLogger(__name__)

LossFn = Callable[[], torch.Tensor]
# A tensor shaped like a parameter -> its groups, [G, n] (a view or a reshape; each element in one group).
GroupView = Callable[[torch.Tensor], torch.Tensor]
_TINY = 1e-30


class Hessian:
    """The Hessian of the mean of `losses` (one closure per batch) w.r.t. `params`, as an operator."""

    def __init__(self, losses: Sequence[LossFn], params: Sequence[torch.Tensor]) -> None:
        if not losses:
            raise ValueError("the Hessian needs at least one batch's loss")
        self.losses = list(losses)
        self.params = list(params)
        # With one batch its gradient graph serves every product (PyHessian keeps it too); with several,
        # keeping all graphs would hold every batch's activations, so each product recomputes them
        # (`hutchinson` avoids that by taking the batches one at a time: `per_batch`).
        self._grads = self._gradients(self.losses[0]) if len(self.losses) == 1 else None

    def per_batch(self) -> Iterator["Hessian"]:
        """One operator per batch, built when reached: only one batch's gradient graph is held at a time
        (as long as the caller drops each before taking the next)."""
        if len(self.losses) == 1:
            yield self
            return
        for loss in self.losses:
            yield Hessian([loss], self.params)

    def _gradients(self, loss_fn: LossFn) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(loss_fn(), self.params, create_graph=True)

    def product(self, vectors: Sequence[torch.Tensor], subset: Sequence[int] | None = None) -> list[torch.Tensor]:
        """H v for v given on the parameters in `subset` (default all), i.e. the block H[subset, subset] v."""
        index = list(range(len(self.params))) if subset is None else list(subset)
        out = [torch.zeros_like(self.params[i]) for i in index]
        for loss_fn in self.losses:
            grads = self._grads if self._grads is not None else self._gradients(loss_fn)
            # a gradient with no graph is constant in the parameters: its block of H is zero
            live = [j for j, i in enumerate(index) if grads[i].requires_grad]
            if not live:
                continue
            hv = torch.autograd.grad([grads[index[j]] for j in live], [self.params[index[j]] for j in live],
                                     grad_outputs=[vectors[j] for j in live],
                                     retain_graph=self._grads is not None, allow_unused=True)
            for j, h in zip(live, hv):
                if h is not None:
                    out[j] += h.detach()
        return [h / len(self.losses) for h in out]


def rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A +-1 tensor shaped like `like`, drawn on the CPU (the same probes on every device)."""
    v = torch.randint(0, 2, like.shape, generator=generator, dtype=torch.int8).to(like.dtype) * 2 - 1
    return v.to(like.device)


@dataclass
class TraceEstimate:
    """Per parameter, [P, G] samples v_g^T (H v)_g of P probes; their mean estimates each group's trace."""

    samples: list[torch.Tensor]
    changes: list[float] = field(default_factory=list)  # relative change of the estimate after each probe

    @property
    def probes(self) -> int:
        return int(self.samples[0].shape[0])

    def mean(self) -> list[torch.Tensor]:
        return [s.mean(0) for s in self.samples]

    def stderr(self) -> list[torch.Tensor]:
        """Standard error of each group's mean (NaN with a single probe)."""
        if self.probes < 2:
            return [torch.full_like(s[0], float("nan")) for s in self.samples]
        return [s.std(0) / self.probes**0.5 for s in self.samples]

    def running(self) -> torch.Tensor:
        """[P, parameters]: each parameter's trace estimate after 1..P probes (for a convergence plot)."""
        totals = torch.stack([s.sum(1) for s in self.samples], 1)  # [P, params]
        return totals.cumsum(0) / torch.arange(1, self.probes + 1, dtype=totals.dtype)[:, None]


def hutchinson(hessian: Hessian, views: Sequence[GroupView], *, max_probes: int = 100, tol: float = 1e-2,
               seed: int = 0, progress: bool = False, desc: str = "hutchinson") -> TraceEstimate:
    """Hutchinson estimates of the trace of every group's diagonal block of H.

    Stops after `max_probes`, or once for every parameter the estimates moved by less than `tol`
    relative to their size: sum_g |t_g(P) - t_g(P-1)| / sum_g |t_g(P)| < tol. The denominator takes
    |trace| (a trace may be negative away from a minimum; PyHessian's signed one never stops there).

    With several batches the batches are taken one at a time, so that each batch's gradient graph is
    built once and serves all its probes (instead of every product rebuilding every batch's graph): the
    first batch's convergence sets the number of probes P, every other batch gets P probes of its own,
    and probe p's sample is the mean over batches of v_{p,b}^T H_b v_{p,b}, an unbiased sample of the
    trace of the mean Hessian.
    """
    if max_probes < 1:
        raise ValueError(f"max_probes={max_probes} must be at least 1")
    generator = torch.Generator().manual_seed(seed)
    samples: list[torch.Tensor] = []  # per parameter, [P, G]: the sum over batches so far
    # one tick per Hessian-vector product: the first batch may stop early, the others take as many probes
    bar = progress_bar(total=max_probes * len(hessian.losses), desc=desc, unit="hvp", progress=progress)
    for batch in hessian.per_batch():
        if not samples:
            samples = _probe_batch(batch, views, max_probes, tol, generator, bar.update)
            bar.total = len(samples[0]) * len(hessian.losses)
        else:
            samples = [s + t for s, t in zip(samples, _probe_batch(batch, views, len(samples[0]), 0.0, generator, bar.update))]
        del batch  # its gradient graph goes before the next batch's is built
    bar.close()
    samples = [s / len(hessian.losses) for s in samples]
    estimate = TraceEstimate(samples)
    running = [s.cumsum(0) / torch.arange(1, len(s) + 1, dtype=s.dtype)[:, None] for s in samples]
    estimate.changes = [max(_change(r[p - 1], r[p]) for r in running) for p in range(1, len(samples[0]))]
    return estimate


def _change(before: torch.Tensor, now: torch.Tensor) -> float:
    """sum_g |now_g - before_g| / sum_g |now_g|: how far the estimates moved, relative to their size."""
    return float((now - before).abs().sum() / now.abs().sum().clamp_min(_TINY))


def _probe_batch(hessian: Hessian, views: Sequence[GroupView], max_probes: int, tol: float,
                 generator: torch.Generator, tick: Callable[[], object] = lambda: None) -> list[torch.Tensor]:
    """Per parameter, [P, G] samples v_g^T (H v)_g of P <= max_probes probes; stops early once the
    estimates move by less than `tol` (see `hutchinson`)."""
    rows: list[list[torch.Tensor]] = []  # per probe, per parameter, [G]
    sums: list[torch.Tensor] = []
    for probe in range(1, max_probes + 1):
        v = [rademacher(p, generator) for p in hessian.params]
        rows.append([view(vi * hvi).sum(1).detach().double().cpu() for vi, hvi, view in zip(v, hessian.product(v), views)])
        tick()
        if probe == 1:
            sums = [sample.clone() for sample in rows[0]]
            continue
        change = 0.0
        for i, sample in enumerate(rows[-1]):
            before = sums[i] / (probe - 1)
            sums[i] += sample
            change = max(change, _change(before, sums[i] / probe))
        # a trace takes minutes on a CPU (hours for BERT-base over many batches): say how far it is
        log.log(logging.INFO if probe % 10 == 0 else logging.DEBUG, "hutchinson probe %d/%d: relative change %.3g",
                probe, max_probes, change)
        if change < tol:
            break
    return [torch.stack(column) for column in zip(*rows)]


def top_eigenvalues(hessian: Hessian, *, max_iter: int = 100, tol: float = 1e-3, seed: int = 0,
                    progress: bool = False) -> list[tuple[float, int]]:
    """(eigenvalue of largest magnitude, iterations) of each parameter's diagonal block, by power
    iteration; stops when the Rayleigh quotient changes by less than `tol` relative to its size. With
    `progress` (and stderr a terminal), a bar over the parameters."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    bar = progress_bar(hessian.params, desc="top eigenvalue", unit="site", progress=progress)
    for i, p in enumerate(bar):
        v = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        v /= v.norm()
        value, it = 0.0, 0
        for it in range(1, max_iter + 1):
            hv = hessian.product([v], [i])[0]
            new = float((v * hv).sum())  # Rayleigh quotient: v has unit norm
            norm = hv.norm()
            if norm == 0:  # the block is zero
                value = 0.0
                break
            v = hv / norm
            done = it > 1 and abs(new - value) < tol * max(abs(new), _TINY)
            value = new
            if done:
                break
        out.append((value, it))
        bar.set_postfix(iterations=it)
        log.log(logging.INFO if (i + 1) % 10 == 0 else logging.DEBUG, "top eigenvalue of site %d/%d: %d power iterations",
                i + 1, len(hessian.params), it)
    return out
