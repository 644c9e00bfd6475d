"""The `search` stage: differentiable precision search (AQ-BERT, arXiv:2112.14938) on a fine-tuned BERT.

The checkpoint becomes a supernet (`space`), the training set is cut in two disjoint parts, and the
bilevel step (`search.bilevel`) runs in the one training loop: weights on one part; logits and LSQ steps
on the other under the size penalty. With `search.kd_weight` both levels' loss also distils from the
checkpoint (search/teacher.py), as QAT's does. Then the architecture is derived (argmax, repaired to the budget)
and written with its picture; the derived model is also evaluated as is, before any QAT.

Everything that can fail on bad input, an unreachable budget included, fails before the run directory
gets its first file.
"""
from __future__ import annotations

import copy
import json
import logging
from typing import Any

import torch
from accelerate.utils import set_seed

from supernet import Architecture, SearchSpace, param_sets, sites

from .bilevel import BilevelStep, CurvatureTerm, SizeTerm, task_loss
from .budget import Budget, Penalty, check_bitops_target, site_candidates, start_at_budget
from .config import AlphaInit, ArchOptimizer, BudgetConfig, Derivation, EvalConfig, MixedPrecision, ModelConfig, SearchConfig, TaskConfig
from .data import make_loader, split_for_search
from .derive import activation_probs, candidate_probs, derive
from .errors import UserError
from .evaluate import evaluate_sets, scalars, stage_metrics
from .loop import Endless, decay_groups, linear_warmup, make_accelerator, total_steps, train
from .models import convert, load_task_model, load_tokenizer
from .plots import plot_architecture
from .prepare import TRAIN, task_data
from .rundir import RunDir, write_text_atomic
from .tasks import get_task
from .teacher import DistilledLoss, TeacherTable, cacheable, teacher_table, with_index

__all__ = ["run_search", "weight_optimizer", "upper_optimizers"]

log = logging.getLogger(__name__)


def weight_optimizer(weights: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the model weights; no decay on biases and LayerNorm."""
    return torch.optim.AdamW(decay_groups(weights, weight_decay), lr=lr)


def upper_optimizers(arch: list[torch.nn.Parameter], scales: list[torch.nn.Parameter], cfg: SearchConfig) -> list:
    """The logits' optimiser (SGD as in AQ-BERT, or Adam as in DARTS) and Adam for the LSQ steps."""
    out = []
    if arch:
        if cfg.arch_optimizer is ArchOptimizer.sgd:
            out.append(torch.optim.SGD(arch, lr=cfg.arch_lr, momentum=cfg.arch_momentum))
        else:
            out.append(torch.optim.Adam(arch, lr=cfg.arch_lr, betas=(0.5, 0.999)))
    if scales:
        out.append(torch.optim.Adam(scales, lr=cfg.scale_lr))
    return out


ACT_ALPHAS = "alphas_input.json"  # the searched activation bits' probabilities, beside the weights' alphas.json


def _rounded(probs: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> dict[str, dict[str, list]]:
    """alphas.json's form: per site (or activation quantizer) its candidate bits and [G, K] probabilities."""
    return {name: {"bits": list(bits), "probs": [[round(v, 4) for v in row] for row in p.tolist()]}
            for name, (bits, p) in probs.items()}


def run_search(
    model: ModelConfig, task: TaskConfig, space: SearchSpace, cfg: SearchConfig, budget_cfg: BudgetConfig,
    evaluation: EvalConfig, run: RunDir, *, seed: int, max_steps: int | None = None,
    max_eval_examples: int | None = None, mixed_precision: MixedPrecision = MixedPrecision.fp32,
    cache_dir: str | None = None, resume: bool = False, progress_bar: bool = True,
) -> dict[str, Any]:
    """Search `space` on `task` from the fine-tuned `model`; writes architecture.json and metrics.json."""
    spec = get_task(task.name)
    set_seed(seed)  # dropout and sampling follow this step's seed, not what ran before it in the process
    budget = Budget.from_args(budget_cfg.avg_bits, budget_cfg.mb, budget_cfg.scope, budget_cfg.match)
    if budget is None and cfg.penalty is not Penalty.linear:
        raise UserError(f"search.penalty={cfg.penalty.value} needs a target: set budget.avg_bits, budget.mb or budget.match, "
                        f"or use search.penalty=linear with search.size_weight")
    if budget is None and cfg.alpha_init is AlphaInit.budget:
        raise UserError("search.alpha_init=budget starts the search at the budget: set budget.avg_bits, budget.mb or "
                        "budget.match, or use search.alpha_init=equal")
    tokenizer = load_tokenizer(model.name_or_path)
    tokenized, sets = task_data(task, tokenizer, evaluation, cache_dir, max_eval_examples, train=True)
    use_table = cfg.kd_weight > 0 and cacheable(spec.kind, 0.0)
    # rows numbered over the whole training set, where the teacher's table has them
    weight_part, arch_part = split_for_search(with_index(tokenized[TRAIN]) if use_table else tokenized[TRAIN],
                                              cfg.weight_fraction, seed)
    net = load_task_model(model.name_or_path, spec.name)
    # the teacher is the model the search starts from (a head the checkpoint lacks included), in FP32
    teacher = copy.deepcopy(net).eval() if cfg.kd_weight > 0 else None
    convert(net, space, model.name_or_path)
    if not any(s.wq.searchable for _, s in sites(net)):
        raise UserError(f"space.w_bits={list(space.w_bits)} offers one candidate: there is nothing to search; "
                        f"give two or more (e.g. [0,2,4,8]) or run stage=qat with that precision")
    template, candidates = Architecture.from_supernet(net, space.scale_bits), site_candidates(net)
    check_bitops_target(cfg.bitops_target, template, candidates, space.a_bits)
    if budget is not None:
        budget.check_reachable(template, candidates)
        if cfg.alpha_init is AlphaInit.budget:
            level = start_at_budget(net, budget, template, cfg.tau_start)
            log.info("search.alpha_init=budget: every group starts around %.3g bits, the budget's uniform point", level)
    weight_loader = make_loader(weight_part, tokenizer, cfg.batch_size, shuffle=True, seed=seed)
    arch_loader = make_loader(arch_part, tokenizer, cfg.batch_size, shuffle=True, seed=seed + 1)
    accelerator = make_accelerator(mixed_precision, seed)

    run.main_process = accelerator.is_main_process
    run.open()
    groups = param_sets(net)
    w_opt = weight_optimizer(groups.weights, cfg.lr, cfg.weight_decay)
    u_opts = upper_optimizers(groups.arch, groups.scales, cfg)
    net, w_opt, weight_loader, arch_loader, *u_opts = accelerator.prepare(net, w_opt, weight_loader, arch_loader, *u_opts)
    for s in sets:
        s.loader = accelerator.prepare(s.loader)
    loss_fn = task_loss
    if teacher is not None:  # the same table as QAT's from this checkpoint (one cache entry serves both)
        teacher = (teacher_table(teacher.to(accelerator.device), tokenized[TRAIN], spec.kind, cache_dir)
                   if use_table else accelerator.prepare(teacher))
        loss_fn = DistilledLoss(teacher, spec.kind, cfg.kd_weight, cfg.kd_temperature)
    steps = total_steps(len(weight_loader), cfg.epochs, max_steps)
    scheduler = linear_warmup(w_opt.optimizer, steps, cfg.lr_warmup_ratio)
    accelerator.register_for_checkpointing(scheduler)
    scope = budget.scope if budget is not None else budget_cfg.scope
    log.info("searching %s on %s: %d steps, %d groups, candidates %s, budget %s%s%s", model.name_or_path, spec.name,
             steps, template.n_groups(), list(space.w_bits), budget or f"none (lambda={cfg.size_weight})",
             "; weights fixed at the checkpoint (search.lr=0)" if cfg.lr == 0 else "",
             f"; distilling from the checkpoint (search.kd_weight={cfg.kd_weight:g})" if teacher is not None else "")

    step_fn = BilevelStep(
        net, groups.weights, groups.arch + groups.scales, w_opt, u_opts,
        Endless(arch_loader, accelerator.skip_first_batches,
                empty="the architecture half of the training set is empty"),
        SizeTerm(cfg.size_weight, budget, cfg.penalty, scope, cfg.bitops_weight, cfg.bitops_target, space.scale_bits),
        loss_fn=loss_fn,
        backward=accelerator.backward, weight_scheduler=scheduler,
        warmup_steps=int(cfg.arch_warmup_ratio * steps), second_order=cfg.second_order, xi=cfg.xi,
        max_grad_norm=cfg.max_grad_norm, group_lasso_weight=cfg.group_lasso, relaxation=cfg.relaxation,
        tau=(cfg.tau_start, cfg.tau_end), total_steps=steps, log_mass_every=cfg.log_mass_every,
        curvature=CurvatureTerm(net, cfg.curvature_weight) if cfg.curvature_weight > 0 else None,
        loss_scale=lambda: accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0,
        unscale=lambda: accelerator.unscale_gradients(w_opt),  # fp16 only; QAT's accelerator.clip_grad_norm_ does it
    )
    result = train(step_fn, weight_loader, accelerator, steps, log_fn=run.log, state_dir=run.train_state,
                   checkpoint_every=cfg.checkpoint_every, resume=resume, log_every=cfg.log_every,
                   progress=progress_bar, desc="search")
    if isinstance(teacher, TeacherTable) and run.main_process:
        teacher.save()

    supernet = accelerator.unwrap_model(net)
    arch, report = derive(supernet, budget, scale_bits=space.scale_bits, exact=cfg.derivation is Derivation.exact,
                          site=cfg.derivation is Derivation.site)
    summary = arch.summary()
    if run.main_process:
        arch.save(run.path / "architecture.json")
        for name, probs in (("alphas.json", candidate_probs(supernet)), (ACT_ALPHAS, activation_probs(supernet))):
            if probs:  # the activations' only where their bits are searched
                write_text_atomic(run.path / name, json.dumps(_rounded(probs)) + "\n")
        picture = plot_architecture(arch, run.path / "architecture.png")
        run.logger.image("architecture", picture)
    arch.apply(supernet)  # the derived model, evaluated before any QAT
    results = evaluate_sets(net, sets, spec.name, accelerator)
    run.log(scalars(results), result.steps)
    budget_info = None if budget is None else {"unit": budget.unit, "target": budget.target, "scope": budget.scope.value}
    # main_metric: the derived model before QAT
    metrics = stage_metrics("search", spec.name, model.name_or_path, results, budget=budget_info,
                            derive=report.as_dict(), architecture=summary, train=result.summary())
    run.write_json("metrics.json", metrics)
    run.logger.summary({"architecture": summary, "derive": report.as_dict(), "eval": results})
    return metrics
