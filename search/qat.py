"""The `qat` stage: quantization-aware training of one fixed Architecture, whoever chose it.

The FP checkpoint becomes a supernet whose candidates are exactly the bits the architecture uses, every
group is fixed to its bits, and the weights and LSQ steps (arXiv:1902.08153) train on the task loss plus,
optionally, knowledge distillation from the FP model (logits KL at a temperature; hidden-state MSE) and
oscillation dampening (Nagel et al., ICML 2022: pull each latent weight toward its quantized value).
Pruned groups output exact zeros throughout. The result, `<run_dir>/quantized/`, holds the supernet's
state (weights, steps, fixed choices), `architecture.json`, the search space, the HF config and tokenizer:
what evaluation and export rebuild the quantized model from.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig

from supernet import Architecture, SearchSpace, SiteKind, param_sets, sites, to_supernet

from .models import MODEL_CLASSES, TASK_FILE
from .rundir import replace_dir
from .tasks import TaskKind, get_task

log = logging.getLogger(__name__)

QUANTIZED_DIR = "quantized"
SPACE_FILE = "space.json"
WEIGHTS_FILE = "model.safetensors"


def space_for(arch: Architecture, base: SearchSpace) -> SearchSpace:
    """`base` with, per kind of site, exactly the bits `arch` uses as candidates (and its group counts)."""

    def used(kind: SiteKind) -> list[int]:
        return sorted({b for _, s in arch if s.kind is kind for b in s.bits}) or [32]

    def groups(kind: SiteKind) -> int | None:
        counts = {(len(s.bits), s.rows_per_group) for _, s in arch if s.kind is kind}
        if not counts:
            return None
        if all(rows == 1 for _, rows in counts):
            return -1  # one group per row, whatever the site's size
        return next(iter(counts))[0]

    a_bits = sorted({s.a_bits for _, s in arch if s.a_bits is not None}) or [32]
    return dataclasses.replace(
        base, w_bits=used(SiteKind.ENCODER), a_bits=a_bits, embedding_bits=used(SiteKind.EMBEDDING),
        head_bits=used(SiteKind.HEAD), groups=groups(SiteKind.ENCODER) or base.groups,
        embedding_groups=groups(SiteKind.EMBEDDING),
    )


def quantize(model: nn.Module, arch: Architecture, base: SearchSpace) -> nn.Module:
    """Convert `model` in place to the discrete quantized model of `arch`."""
    to_supernet(model, space_for(arch, base))
    return arch.apply(model)


def space_to_dict(space: SearchSpace) -> dict[str, Any]:
    return {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(space).items()}


def save_quantized(model: nn.Module, arch: Architecture, space: SearchSpace, tokenizer: Any, task: str,
                   target: Path) -> Path:
    """Write the QAT'd model atomically: supernet state, architecture, space, HF config, tokenizer."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=False)
    save_model(model, str(tmp / WEIGHTS_FILE))  # handles the Q/K/V-shared input quantizer
    arch.save(tmp / "architecture.json")
    (tmp / SPACE_FILE).write_text(json.dumps(space_to_dict(space), indent=2) + "\n")
    model.config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / TASK_FILE).write_text(json.dumps({"task": task}) + "\n")
    replace_dir(tmp, target)
    return target


def is_quantized_dir(path: str | Path) -> bool:
    p = Path(path).expanduser()
    return (p / "architecture.json").is_file() and (p / SPACE_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def load_quantized(path: str | Path) -> tuple[nn.Module, Architecture, str]:
    """Rebuild (model, architecture, task) from a `quantized/` folder written by `save_quantized`."""
    path = Path(path).expanduser()
    if not is_quantized_dir(path):
        raise FileNotFoundError(f"{path} is not a quantized model folder (needs architecture.json, {SPACE_FILE}, "
                                f"{WEIGHTS_FILE}); pass the quantized/ folder a qat run wrote")
    arch = Architecture.load(path / "architecture.json")
    space = SearchSpace(**json.loads((path / SPACE_FILE).read_text()))
    task = json.loads((path / TASK_FILE).read_text())["task"]
    config = AutoConfig.from_pretrained(str(path))
    model = MODEL_CLASSES[get_task(task).kind].from_config(config)
    to_supernet(model, space)
    arch.apply(model)
    missing, unexpected = load_model(model, str(path / WEIGHTS_FILE), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS_FILE} does not match its architecture ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected tensors, e.g. {(missing or unexpected)[:2]}); re-run qat")
    for module in model.modules():  # the fixed choices and initialised flags came in as buffers
        if hasattr(module, "_refresh"):
            module._refresh()
    return model.eval(), arch, task


def distillation_loss(student: Any, teacher: Any, kind: TaskKind, temperature: float,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) on softened logits, times T^2 (Hinton et al.); MSE for regression."""
    if kind is TaskKind.QUESTION_ANSWERING:
        pairs = [(student.start_logits, teacher.start_logits), (student.end_logits, teacher.end_logits)]
    else:
        pairs = [(student.logits, teacher.logits)]
    total = 0.0
    for s, t in pairs:
        if kind is TaskKind.REGRESSION:
            total = total + F.mse_loss(s, t)
            continue
        kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                      reduction="none", log_target=True).sum(-1)  # [B] or [B, T]
        if kind is TaskKind.TOKEN_CLASSIFICATION and mask is not None:
            kl = (kl * mask).sum() / mask.sum().clamp_min(1)
        else:
            kl = kl.mean()
        total = total + kl * temperature**2
    return total / len(pairs)


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
    decay = [p for p in sets.weights if p.dim() >= 2]
    no_decay = [p for p in sets.weights if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr},
              {"params": sets.scales, "weight_decay": 0.0, "lr": scale_lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def qat_step(model: nn.Module, teacher: nn.Module | None, optimizer, scheduler, accelerator: Accelerator,
             kind: TaskKind, *, kd_weight: float, kd_temperature: float, hidden_weight: float,
             dampen_weight: float, max_grad_norm: float):
    """The step function for `search.loop.train`: task loss (+ KD, + dampening), one optimiser step."""
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def step(batch: Mapping[str, torch.Tensor], index: int) -> dict[str, float]:
        model.train()
        want_hidden = teacher is not None and hidden_weight > 0
        out = model(**batch, output_hidden_states=want_hidden)
        loss = out.loss
        logs = {"loss/task": loss.item()}
        if teacher is not None and (kd_weight > 0 or hidden_weight > 0):
            with torch.no_grad():
                t_out = teacher(**batch, output_hidden_states=want_hidden)
            mask = (batch["labels"] != -100).float() if kind is TaskKind.TOKEN_CLASSIFICATION else None
            kd = distillation_loss(out, t_out, kind, kd_temperature, mask)
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
        logs["loss"] = loss.item()
        logs["lr"] = scheduler.get_last_lr()[0]
        return logs

    return step

