"""The DARTS architect for precision search (DARTS, arXiv:1806.09055; AQ-BERT, arXiv:2112.14938).

Two levels, two disjoint halves of the training set:
  * the weight step fits the model weights on the weights half (the inner problem);
  * the architecture step fits the logits and the quantizer scales on the architecture half, under
    the task loss plus a size term (the outer problem).
First order alternates plain updates. Second order follows DARTS's unrolled step: the architecture
gradient is taken at the weights after one virtual SGD step w' = w - xi * dL_train/dw, and corrected by
- xi * d2L_train/(dalpha dw) . dL_val/dw', the Hessian-vector product estimated by finite differences.

`BilevelStep` is a step function for `search.loop.train`: it draws its own batches of the architecture
half and runs both optimisers, so the loop itself is the same one fine-tuning and QAT use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from supernet import Relaxation, Scope, expected_bitops, expected_size, set_relaxation, sites
from supernet.cost import FP32_BITS
from supernet.quantizers import group_errors

from .budget import Budget, Penalty
from .derive import activation_probs
from .loop import Endless, batch_size

Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def task_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The Hugging Face model's own loss for a batch with labels."""
    return model(**batch).loss


@dataclass
class SizeTerm:
    """The size part of the architecture loss: lambda * penalty(expected size), plus, optionally,
    bitops_weight * relu(log(expected bit-operations per token / bitops_target)) (a bit-operations budget:
    a penalty only above the target; derivation enforces the size budget, not this one)."""

    weight: float  # lambda
    budget: Budget | None = None  # None: lambda * expected MiB of `scope`, no target
    penalty: Penalty = Penalty.log_ratio
    scope: Scope = Scope.ENCODER
    bitops_weight: float = 0.0
    bitops_target: float | None = None  # GBOPs per token
    scale_bits: int = FP32_BITS  # the bits of each group's stored step (space.scale_bits), part of its size

    def __call__(self, model: nn.Module) -> tuple[torch.Tensor, dict[str, float]]:
        scope = self.budget.scope if self.budget is not None else self.scope
        size = expected_size(model, scope, self.scale_bits)
        if self.budget is not None:
            term = self.budget.penalty(size, self.penalty)
        else:
            term = size.mb
        logs = {"size/expected_mb": size.mb.item(), "size/expected_avg_bits": size.avg_bits.item(), "loss/size": term.item()}
        total = self.weight * term
        if self.bitops_weight > 0 and self.bitops_target is not None:
            gbops = expected_bitops(model) / 1e9
            over = torch.relu(torch.log(gbops / self.bitops_target))
            logs.update({"size/expected_gbops": gbops.item(), "loss/bitops": over.item()})
            total = total + self.bitops_weight * over
        return total, logs


KEEP_FLOOR = 1e-2  # a group pruned with probability above 0.99 has its gradient scaled back by at most 100


class CurvatureTerm:
    """A second-order price on every candidate of every searched group, added to the architecture loss:
    weight * sum_g sum_k p_gk * Omega_gk with Omega_gk = 1/2 sum_i F_i (Q_k(w_i) - w_i)^2, the loss that
    switching group g wholly to candidate k adds to second order (OBD's diagonal; FIT, arXiv:2210.08502).

    The softmax mixture's own gradient only sees the first-order change of switching a candidate, and at a
    fine-tuned minimum that is near zero, so the size penalty meets no resistance where it prunes: a pruned
    group's cost, 1/2 w^T H w, is second order. F is the empirical Fisher of one example: B times an
    exponential average (`decay`) of the squared gradient of the architecture batches (B examples), taken
    from the architecture step's own backward. That gradient reaches a weight through the candidates that keep
    it, so it is (1 - p_pruned) times the gradient of the weight the network uses: it is divided back out
    (else the price of pruning a group would fall to zero exactly as the search prunes it). Omega is a constant
    per step (no gradient to the weights or the steps), so the term moves only the logits.
    """

    def __init__(self, model: nn.Module, weight: float, decay: float = 0.95) -> None:
        self.weight, self.decay = weight, decay
        self.sites = [site for _, site in sites(model) if site.wq.searchable]
        self.params = [site.weight for site in self.sites]
        self.fisher = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self, grads: Sequence[torch.Tensor | None], batch_size: int, loss_scale: float = 1.0) -> None:
        """Fold one batch's gradients of the sites' weights (aligned with `params`) into the Fisher."""
        factor = (1 - self.decay) * batch_size / loss_scale**2
        for site, f, g in zip(self.sites, self.fisher, grads):
            if g is not None:
                g = g.float()
                keep = site.wq.keep_prob(site.wq.mean_probs().detach())  # [G], None without a pruned candidate
                if keep is not None:
                    g = site.from_groups(site.to_groups(g) / keep.float().clamp_min(KEEP_FLOOR)[:, None])
                f.mul_(self.decay).add_(g.pow(2), alpha=factor)
        self.updates += 1

    def __call__(self) -> tuple[torch.Tensor, dict[str, float]]:
        total = torch.zeros((), device=self.fisher[0].device) if self.fisher else torch.zeros(())
        if not self.updates or self.weight == 0:
            return total, {}
        unbias = 1 - self.decay**self.updates  # the average started at zero
        for site, f in zip(self.sites, self.fisher):
            omega = group_errors(site.to_groups(site.weight.float()), site.wq.step, site.wq.cands.bits,
                                 site.to_groups(f), site.wq.cands.mode) * (0.5 / unbias)  # [G, K]
            total = total + (site.wq.mean_probs() * omega.to(site.wq.alpha.dtype)).sum()
        return self.weight * total, {"loss/curvature": total.item()}


def group_lasso(model: nn.Module) -> torch.Tensor:
    """Sum over groups of the L2 norm of their weights: drives whole groups toward zero (and 0 bits)."""
    total = 0.0
    for _, site in sites(model):
        if 0 not in site.wq.cands.bits:
            continue
        total = total + site.to_groups(site.weight).norm(dim=1).sum()
    return torch.as_tensor(total)


def temperature(step: int, total: int, start: float, end: float) -> float:
    """Exponential anneal from `start` to `end` over `total` steps."""
    if total <= 1 or start == end:
        return end if total <= 1 else start
    frac = min(max(step / (total - 1), 0.0), 1.0)
    return start * (end / start) ** frac


def probability_mass(model: nn.Module) -> dict[str, float]:
    """Share of the weights each candidate holds, overall (`mass/<bits>`) and per site (`mass/<site>/<bits>`, which
    the tracker gets and run.log's step lines leave out), from the noise-free probabilities. Searched activation
    bits alike: `mass_input/<bits>` (the mean over the quantizers) and `mass_input/<site>/<bits>` (see
    `activation_probs`)."""
    out: dict[str, float] = {}
    overall: dict[int, float] = {}
    total = 0
    with torch.no_grad():
        for name, site in sites(model):
            p = site.wq.mean_probs().float().mean(0)  # [G, K] -> [K]
            n = site.weight.numel()
            total += n
            for b, m in zip(site.wq.cands.bits, p.tolist()):
                out[f"mass/{name}/{b}"] = m
                overall[b] = overall.get(b, 0.0) + m * n
    out.update({f"mass/{b}": v / total for b, v in sorted(overall.items())})
    inputs = activation_probs(model)
    act: dict[int, float] = {}
    for name, (bits, p) in inputs.items():
        for b, m in zip(bits, p[0].tolist()):
            out[f"mass_input/{name}/{b}"] = m
            act[b] = act.get(b, 0.0) + m / len(inputs)
    out.update({f"mass_input/{b}": v for b, v in sorted(act.items())})
    return out


def finite_difference_hvp(
    loss_fn: Callable[[], torch.Tensor], weights: Sequence[nn.Parameter], upper: Sequence[nn.Parameter],
    v: Sequence[torch.Tensor], r: float = 1e-2,
) -> list[torch.Tensor]:
    """(d2 L / d upper d w) . v by central differences: [dL/du(w + e v) - dL/du(w - e v)] / 2e, e = r / |v|.

    Both points see the same dropout masks and Gumbel draws (the random state is replayed for the second): with
    their own, the difference was mostly noise, about 20 times the curvature term it estimates."""
    norm = torch.sqrt(sum((t.float() ** 2).sum() for t in v))
    eps = r / max(float(norm), 1e-12)
    cuda = sorted({w.device.index or 0 for w in weights if w.device.type == "cuda"})
    states = torch.get_rng_state(), [torch.cuda.get_rng_state(i) for i in cuda]
    with torch.no_grad():
        for w, t in zip(weights, v):
            w.add_(t, alpha=eps)
    plus = torch.autograd.grad(loss_fn(), upper, allow_unused=True)
    with torch.no_grad():
        for w, t in zip(weights, v):
            w.sub_(t, alpha=2 * eps)
    torch.set_rng_state(states[0])
    for i, state in zip(cuda, states[1]):
        torch.cuda.set_rng_state(state, i)
    minus = torch.autograd.grad(loss_fn(), upper, allow_unused=True)
    with torch.no_grad():
        for w, t in zip(weights, v):
            w.add_(t, alpha=eps)
    return [torch.zeros_like(u) if a is None else (a - b) / (2 * eps) for u, a, b in zip(upper, plus, minus)]


class BilevelStep:
    """One search step: (after warm-up) an architecture step on the architecture half, then a weight step
    (none when the weight optimiser's lr is 0: the weights stay fixed)."""

    def __init__(
        self,
        model: nn.Module,
        weights: Sequence[nn.Parameter],
        upper: Sequence[nn.Parameter],
        weight_opt: torch.optim.Optimizer,
        upper_opts: Sequence[torch.optim.Optimizer],
        arch_batches: Endless,
        size_term: SizeTerm,
        *,
        loss_fn: LossFn = task_loss,
        backward: Callable[..., None] | None = None,
        weight_scheduler=None,
        warmup_steps: int = 0,
        second_order: bool = False,
        xi: float | None = None,
        max_grad_norm: float = 1.0,
        group_lasso_weight: float = 0.0,
        relaxation: Relaxation = Relaxation.SOFTMAX,
        tau: tuple[float, float] = (1.0, 1.0),
        total_steps: int = 1,
        log_mass_every: int = 50,
        curvature: CurvatureTerm | None = None,
        loss_scale: Callable[[], float] | None = None,
        unscale: Callable[[], None] | None = None,
    ) -> None:
        self.model, self.weights, self.upper = model, list(weights), list(upper)
        self.weight_opt, self.upper_opts, self.weight_scheduler = weight_opt, list(upper_opts), weight_scheduler
        self.arch_batches, self.size_term, self.loss_fn = arch_batches, size_term, loss_fn
        self.backward = backward or (lambda loss, **kw: loss.backward(**kw))
        self.warmup_steps, self.second_order = warmup_steps, second_order
        # by default the weights' lr; a scheduler keeps the base in initial_lr (a warmup sets lr to 0 at first)
        group = weight_opt.param_groups[0]
        self.xi = xi if xi is not None else group.get("initial_lr", group["lr"])
        self.max_grad_norm, self.group_lasso_weight = max_grad_norm, group_lasso_weight
        self.relaxation, self.tau, self.total_steps = Relaxation(relaxation), tau, total_steps
        self.log_mass_every = log_mass_every
        self.curvature = curvature
        self.loss_scale = loss_scale or (lambda: 1.0)  # fp16's gradient scaler, which the Fisher must undo
        self.unscale = unscale or (lambda: None)  # fp16: divide the weights' gradients by it before clipping them
        # lr 0: the weights stay where they are (the architecture is searched for the checkpoint's weights,
        # which QAT starts from); the weight step would only cost time
        self.train_weights = any(g["lr"] > 0 for g in weight_opt.param_groups)

    def __call__(self, batch: Batch, step: int) -> dict[str, float]:
        self.model.train()  # from_pretrained and evaluation leave it in eval mode: no dropout, no Gumbel noise
        tau = temperature(step, self.total_steps, *self.tau)
        set_relaxation(self.model, self.relaxation, tau)
        logs: dict[str, float] = {"temperature": tau}
        if step >= self.warmup_steps:
            # by position, not by what this process drew before: a resumed search takes the same batch
            logs.update(self.arch_step(self.arch_batches.at(step - self.warmup_steps), batch))
        else:  # the architecture waits, but the expected size and its penalty are still worth a curve
            with torch.no_grad():
                logs.update(self.size_term(self.model)[1])
        if self.train_weights:
            logs.update(self.weight_step(batch))
        last = step == self.total_steps - 1  # the distributions the search ends with reach the tracker too
        if self.log_mass_every and (step % self.log_mass_every == 0 or last):
            logs.update(probability_mass(self.model))
        return logs

    def weight_step(self, batch: Batch) -> dict[str, float]:
        self.weight_opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model, batch)
        logs = {"loss/weights": loss.item()}
        total = loss
        if self.group_lasso_weight:
            lasso = group_lasso(self.model)
            total = loss + self.group_lasso_weight * lasso
            logs["loss/group_lasso"] = lasso.item()
        self.backward(total, inputs=self.weights)
        if self.max_grad_norm > 0:
            self.unscale()  # clipping fp16's scaled gradients at 1 left ~1e-9 per weight, below AdamW's eps
            torch.nn.utils.clip_grad_norm_(self.weights, self.max_grad_norm)
        self.weight_opt.step()
        if self.weight_scheduler is not None:
            self.weight_scheduler.step()
        return logs

    def arch_step(self, arch_batch: Batch, train_batch: Batch) -> dict[str, float]:
        loss, size_logs = self.arch_gradients(arch_batch, train_batch)
        for opt in self.upper_opts:  # logits and steps may have optimisers of their own
            opt.step()
        return {"loss/arch_task": loss, **size_logs}

    def arch_gradients(self, arch_batch: Batch, train_batch: Batch) -> tuple[float, dict[str, float]]:
        """Set the gradients of the logits and steps for one architecture step (first order, or DARTS unrolled),
        without stepping; returns the architecture batch's task loss and the size terms' logs."""
        for p in self.upper:
            p.grad = None
        if self.second_order:
            loss, size_logs = self._unrolled_grads(arch_batch, train_batch)
        else:
            task = self.loss_fn(self.model, arch_batch)
            size, size_logs = self._size_terms()
            fisher = self.curvature.params if self.curvature is not None else []
            for p in fisher:
                p.grad = None  # the last weight step leaves its gradients there, and backward would add to them
            self.backward(task + size, inputs=self.upper + fisher)
            if self.curvature is not None:
                self._update_fisher([p.grad for p in fisher], arch_batch, self.loss_scale())
                for p in fisher:
                    p.grad = None  # the weight step takes its own gradients
            loss = task.item()
        return loss, size_logs

    def _size_terms(self) -> tuple[torch.Tensor, dict[str, float]]:
        """The size penalty, plus the curvature term when there is one."""
        size, logs = self.size_term(self.model)
        if self.curvature is None:
            return size, logs
        curv, curv_logs = self.curvature()
        return size + curv, {**logs, **curv_logs}

    def _update_fisher(self, grads: Sequence[torch.Tensor | None], batch: Batch, loss_scale: float = 1.0) -> None:
        self.curvature.update(grads, batch_size(batch), loss_scale)

    def _unrolled_grads(self, arch_batch: Batch, train_batch: Batch) -> tuple[float, dict[str, float]]:
        """DARTS eq. 7-8: grads of L_val(w', a) with w' one virtual SGD step ahead, minus xi * HVP."""
        g_train = torch.autograd.grad(self.loss_fn(self.model, train_batch), self.weights, allow_unused=True)
        backup = [w.detach().clone() for w in self.weights]
        with torch.no_grad():
            for w, g in zip(self.weights, g_train):
                if g is not None:
                    w.sub_(g, alpha=self.xi)
        task = self.loss_fn(self.model, arch_batch)
        size, size_logs = self._size_terms()
        grads = torch.autograd.grad(task + size, self.upper + self.weights, allow_unused=True)
        d_upper = [torch.zeros_like(u) if g is None else g for u, g in zip(self.upper, grads[: len(self.upper)])]
        d_w = [torch.zeros_like(w) if g is None else g for w, g in zip(self.weights, grads[len(self.upper):])]
        if self.curvature is not None:  # the Fisher at w', where the architecture is judged
            by_id = {id(w): g for w, g in zip(self.weights, d_w)}
            self._update_fisher([by_id.get(id(p)) for p in self.curvature.params], arch_batch)
        with torch.no_grad():
            for w, b in zip(self.weights, backup):
                w.copy_(b)
        hvp = finite_difference_hvp(lambda: self.loss_fn(self.model, train_batch), self.weights, self.upper, d_w)
        for u, g, h in zip(self.upper, d_upper, hvp):
            u.grad = g - self.xi * h
        return task.item(), size_logs
