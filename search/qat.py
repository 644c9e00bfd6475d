"""The `qat` stage: quantization-aware training of one fixed Architecture, whoever chose it.

The FP checkpoint becomes a supernet whose candidates are exactly the bits the architecture uses, every
group is fixed to its bits, and the weights and LSQ steps (arXiv:1902.08153) train on the task loss plus,
optionally, knowledge distillation from the FP model (logits KL at a temperature; hidden-state MSE) and
oscillation dampening and iterative weight freezing (Nagel et al., ICML 2022: pull each latent weight toward
its quantized value; freeze the weights whose code keeps flipping, search/freezing.py). Logits distillation
reads the teacher's outputs from a table that computes each training example's once (search/teacher.py) unless
`qat.teacher_cache=false` or the task needs the live teacher.
With `qat.init=supernet` the weights and LSQ steps start where the search that wrote `qat.architecture` left
them (its run directory's final train state), not at the FP checkpoint: the supernet's weights have adapted
to the allocation during the search, the FP weights have not. The teacher is the FP model. (On SST-2 the head
start did not survive QAT: BENCHMARKS.md; hence not the default.)
Pruned groups output exact zeros throughout. The result is `<run_dir>/quantized/` (search/quantized.py),
what evaluation and export rebuild the quantized model from.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import OmegaConf
from safetensors.torch import load_model
from torch import nn

from supernet import ActQuantizer, Architecture, SearchSpace, WeightQuantizer, param_sets, sites, to_supernet

from .config import EvalConfig, MixedPrecision, ModelConfig, QatConfig, QatInit, TaskConfig
from .data import make_loader
from .errors import UserError, first_line
from .evaluate import evaluate_sets, scalars, stage_metrics
from .freezing import OscillationFreezer
from .loop import decay_groups, linear_warmup, make_accelerator, total_steps, train
from .models import load_task_model, load_tokenizer
from .prepare import TRAIN, task_data
from .quantized import QUANTIZED_DIR, load_architecture, quantize_user_model, save_quantized, space_for
from .rundir import RunDir, saved_train_state
from .tasks import TaskKind, get_task
from .teacher import (TeacherTable, cacheable, distillation_loss, kd_mask, split_rows, teacher_outputs, teacher_table,
                      with_index)

log = logging.getLogger(__name__)


def dampening(model: nn.Module) -> torch.Tensor:
    """Mean squared distance of the latent weights to their quantized values (Nagel et al., 2022)."""
    total, n = 0.0, 0
    for _, site in sites(model):
        if not site.wq.fixed or site.wq.cands.is_identity:
            continue
        w, _ = site.quantized_weight()
        total = total + (site.weight - w.detach()).pow(2).sum()
        n += site.weight.numel()
    return torch.as_tensor(total) / max(n, 1)


def qat_optimizer(model: nn.Module, lr: float, scale_lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over weights (decay off for biases and LayerNorm) and the LSQ steps (own lr, no decay)."""
    sets = param_sets(model)
    groups = decay_groups(sets.weights, weight_decay, lr=lr)
    if sets.scales:
        groups.append({"params": sets.scales, "weight_decay": 0.0, "lr": scale_lr})
    return torch.optim.AdamW(groups, lr=lr)


def qat_step(model: nn.Module, teacher: nn.Module | TeacherTable | None, optimizer, scheduler, accelerator: Accelerator,
             kind: TaskKind, *, kd_weight: float, kd_temperature: float, hidden_weight: float,
             dampen_weight: float, max_grad_norm: float, freezer: OscillationFreezer | None = None):
    """The step function for `search.loop.train`: task loss (+ KD, + dampening), one optimiser step.
    `teacher` is the FP model, or a table of its outputs (then batches carry their rows' `INDEX`)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def step(batch: Mapping[str, torch.Tensor], index: int) -> dict[str, float]:
        model.train()
        batch, rows = split_rows(batch)
        want_hidden = teacher is not None and hidden_weight > 0
        out = model(**batch, output_hidden_states=want_hidden)
        loss = out.loss
        logs = {"loss/task": loss.item()}
        if teacher is not None and (kd_weight > 0 or hidden_weight > 0):
            t_out = teacher_outputs(teacher, batch, rows, out.loss.device, hidden=want_hidden)  # QA outputs have no .logits
            kd = distillation_loss(out, t_out, kind, kd_temperature, kd_mask(batch, kind))
            loss = (1 - kd_weight) * loss + kd_weight * kd
            logs["loss/kd"] = kd.item()
            if want_hidden:
                hid = sum(F.mse_loss(s, t) for s, t in zip(out.hidden_states, t_out.hidden_states)) / len(out.hidden_states)
                loss = loss + hidden_weight * hid
                logs["loss/hidden"] = hid.item()
        if dampen_weight > 0:
            damp = dampening(accelerator.unwrap_model(model))
            loss = loss + dampen_weight * damp
            logs["loss/dampen"] = damp.item()
        accelerator.backward(loss)
        if max_grad_norm > 0:
            logs["grad_norm"] = float(accelerator.clip_grad_norm_(params, max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if freezer is not None:
            logs.update(freezer())
        logs["loss"] = loss.item()
        logs["lr"] = scheduler.get_last_lr()[0]
        return logs

    return step


SUPERNET_STATE = Path("train_state") / "model.safetensors"  # a search run's final supernet


def search_supernet(search_dir: Path, option: str) -> tuple[SearchSpace, Path]:
    """The space and the final supernet weights of the search run in `search_dir`; a UserError naming
    `option` when the folder holds no finished search."""
    metrics, state = search_dir / "metrics.json", search_dir / SUPERNET_STATE
    stage = json.loads(metrics.read_text()).get("stage") if metrics.is_file() else None
    if stage != "search" or not state.is_file() or not (search_dir / "config.yaml").is_file():
        raise UserError(f"qat.init=supernet needs {option} to be the architecture.json of a finished search run, "
                        f"and {search_dir} holds no search's {SUPERNET_STATE}; use qat.init=checkpoint")
    try:
        section = OmegaConf.load(search_dir / "config.yaml").get("space")
        space = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SearchSpace), section or {}))
    except Exception as e:  # omegaconf's own errors, or SearchSpace's validation: the file is not this version's
        raise UserError(f"{search_dir / 'config.yaml'}: its space section cannot be read ({first_line(e)}); "
                        f"use qat.init=checkpoint or re-run the search") from e
    return space, state


@torch.no_grad()
def inherit_supernet(net: nn.Module, name_or_path: str, task: str, search_dir: Path, option: str) -> None:
    """Copy into the quantized model `net` the search's final weights and, per group, the LSQ step of the
    candidate its architecture fixed (activation steps likewise): QAT then starts from the model the search
    evaluated, not from the FP checkpoint."""
    space, state = search_supernet(search_dir, option)
    ref = to_supernet(load_task_model(name_or_path, task), space)
    missing, unexpected = load_model(ref, str(state), strict=False)
    if missing or unexpected:
        raise UserError(f"{state} does not fit {name_or_path} ({len(missing)} missing, {len(unexpected)} unexpected "
                        f"tensors, e.g. {(missing or unexpected)[:2]}); pass the search run of this checkpoint")
    src = dict(ref.named_modules())
    for name, module in net.named_modules():
        other = src.get(name)
        if other is None or type(other) is not type(module):
            raise UserError(f"{state} has no {type(module).__name__} {name!r}; pass the search run of {name_or_path}")
        if isinstance(module, (WeightQuantizer, ActQuantizer)):
            try:
                cols = [other.cands.bits.index(b) for b in module.cands.bits]
            except ValueError:
                raise UserError(f"{name}: the search offered bits {list(other.cands.bits)}, the architecture uses "
                                f"{list(module.cands.bits)}; pass the search run that wrote {option}") from None
            module.step.copy_(other.step[:, cols])
            if getattr(module, "offset", None) is not None:
                module.offset.copy_(other.offset[:, cols])
            if isinstance(module, ActQuantizer):
                module.initialized.copy_(other.initialized)
                module._refresh()
            continue
        for pname, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            tensor.copy_(getattr(other, pname))
    log.info("QAT starts from the weights and LSQ steps of the search in %s", search_dir)


def run_qat(
    model: ModelConfig, task: TaskConfig, space: SearchSpace, cfg: QatConfig, evaluation: EvalConfig, run: RunDir,
    *, seed: int, max_steps: int | None = None, max_eval_examples: int | None = None,
    mixed_precision: MixedPrecision = MixedPrecision.fp32, cache_dir: str | None = None, resume: bool = False,
    progress_bar: bool = True, architecture: Architecture | None = None,
) -> dict[str, Any]:
    """QAT of `cfg.architecture` (or `architecture`) from the FP checkpoint `model`; writes quantized/ and
    metrics.json (task metrics and the exact sizes)."""
    spec = get_task(task.name)
    set_seed(seed)  # dropout and sampling follow this step's seed, not what ran before it in the process
    if architecture is None:
        if cfg.architecture is None:
            raise UserError("qat.architecture is not set; pass the architecture.json a search or hawq run wrote")
        architecture = load_architecture(cfg.architecture, "qat.architecture")
    tokenizer = load_tokenizer(model.name_or_path)
    tokenized, sets = task_data(task, tokenizer, evaluation, cache_dir, max_eval_examples, train=True)
    net = load_task_model(model.name_or_path, spec.name)
    quantize_user_model(net, architecture, space, cfg.architecture or "the architecture", model.name_or_path)
    qspace = space_for(architecture, space)  # valid: quantize_user_model built the model from it
    if cfg.init is QatInit.supernet:
        if cfg.architecture is None:
            raise UserError("qat.init=supernet needs qat.architecture: the architecture.json of a search run")
        if resume and saved_train_state(run.train_state) is not None:  # it replaces the start anyway
            log.info("qat.init=supernet: resuming from %s, so the search's weights are not loaded", run.train_state)
        else:
            inherit_supernet(net, model.name_or_path, spec.name, Path(cfg.architecture).parent, "qat.architecture")
    teacher = load_task_model(model.name_or_path, spec.name).eval() if cfg.kd_weight > 0 or cfg.hidden_weight > 0 else None
    use_table = teacher is not None and cfg.teacher_cache and cacheable(spec.kind, cfg.hidden_weight)
    train_set = with_index(tokenized[TRAIN]) if use_table else tokenized[TRAIN]
    train_loader = make_loader(train_set, tokenizer, cfg.batch_size, shuffle=True, seed=seed)
    accelerator = make_accelerator(mixed_precision, seed)

    run.main_process = accelerator.is_main_process
    run.open()
    optimizer = qat_optimizer(net, cfg.lr, cfg.scale_lr, cfg.weight_decay)
    net, optimizer, train_loader = accelerator.prepare(net, optimizer, train_loader)
    if use_table:  # in fp32 on the accelerator's device, computing the rows no run has cached yet
        teacher = teacher_table(teacher.to(accelerator.device), tokenized[TRAIN], spec.kind, cache_dir)
    elif teacher is not None:
        teacher = accelerator.prepare(teacher)
    for s in sets:
        s.loader = accelerator.prepare(s.loader)
    steps = total_steps(len(train_loader), cfg.epochs, max_steps)
    scheduler = linear_warmup(optimizer.optimizer, steps, cfg.warmup_ratio)
    accelerator.register_for_checkpointing(scheduler)
    freezer = None
    if cfg.freeze_threshold > 0:
        freezer = OscillationFreezer(accelerator.unwrap_model(net), cfg.freeze_threshold, cfg.freeze_momentum)
        accelerator.register_for_checkpointing(freezer)
    summary = architecture.summary()
    log.info("QAT of %s (%.3g bits/weight, %.3g MiB encoder, %d pruned groups) on %s: %d steps",
             cfg.architecture or "the given architecture", summary["encoder_avg_bits"], summary["encoder_mb"],
             summary["pruned_groups"], spec.name, steps)
    step_fn = qat_step(net, teacher, optimizer, scheduler, accelerator, spec.kind, kd_weight=cfg.kd_weight,
                       kd_temperature=cfg.kd_temperature, hidden_weight=cfg.hidden_weight,
                       dampen_weight=cfg.dampen_weight, max_grad_norm=cfg.max_grad_norm, freezer=freezer)
    result = train(step_fn, train_loader, accelerator, steps, log_fn=run.log, state_dir=run.train_state,
                   checkpoint_every=cfg.checkpoint_every, resume=resume, log_every=cfg.log_every,
                   progress=progress_bar, desc="qat")
    if isinstance(teacher, TeacherTable) and run.main_process:
        teacher.save()
    results = evaluate_sets(net, sets, spec.name, accelerator)
    run.log(scalars(results), result.steps)
    if run.main_process:
        save_quantized(accelerator.unwrap_model(net), architecture, qspace, tokenizer, spec.name, run.path / QUANTIZED_DIR)
        architecture.save(run.path / "architecture.json")
    metrics = stage_metrics("qat", spec.name, model.name_or_path, results, architecture=summary,
                            architecture_file=cfg.architecture, init=str(cfg.init), train=result.summary(),
                            quantized=str(run.path / QUANTIZED_DIR))
    run.write_json("metrics.json", metrics)
    run.logger.summary({"architecture": summary, "eval": results, "train": metrics["train"]})
    return metrics
