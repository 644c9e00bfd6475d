"""The one training loop: fine-tuning now; bilevel search, QAT and the baselines plug into it later.

The loop owns the iteration (epochs, `max_steps`, resuming mid-epoch), the progress bar, periodic
evaluation, logging and resumable checkpoints. What happens in one step is a callable the stage supplies,
`step_fn(batch, step) -> {name: float}`: a supervised step (`supervised_step`) for fine-tuning and QAT,
and later a DARTS step (arXiv:1806.09055) that draws a batch of the architecture half itself and runs
two optimisers. The loop iterates the loader it is given (the weights half, for the search).

Devices and precision come from an accelerate `Accelerator` (`make_accelerator`), so the same code runs
on a CPU, one GPU or several; the loop never moves tensors itself.

Resuming: `train_state/` holds what the accelerator checkpoints (prepared models, optimisers and
loaders, objects registered with `accelerator.register_for_checkpointing` such as schedulers, and the
RNG states) plus the step counter, written to a temporary directory and renamed. The training loader
uses accelerate's seedable sampler (epoch e is shuffled with seed + e), so a resumed run replays the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch import nn
from transformers import get_linear_schedule_with_warmup

from search.config import MixedPrecision
from search.progress import progress_bar
from search.rundir import STATE_FILE, replace_dir, saved_train_state

__all__ = [
    "batch_size",
    "Endless",
    "StepFn",
    "LogFn",
    "LoopResult",
    "make_accelerator",
    "total_steps",
    "adamw",
    "linear_warmup",
    "supervised_step",
    "train",
    "save_train_state",
    "load_train_state",
]

log = logging.getLogger(__name__)

StepFn = Callable[[Any, int], Mapping[str, float]]  # (batch, index of this step from 0) -> scalars
LogFn = Callable[[Mapping[str, float], int], None]  # (metrics, completed steps)


@dataclass
class LoopResult:
    steps: int  # completed steps in total, including those before a resume
    start_step: int  # where this session started (0 unless resumed)
    epochs: float
    wall_s: float  # this session
    examples: int  # training examples this session, over all processes
    last_eval: dict[str, float] | None = None

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> dict[str, float]:
        """What metrics.json records of the training run."""
        return {"steps": self.steps, "start_step": self.start_step, "epochs": self.epochs,
                "examples": self.examples, "wall_s": self.wall_s, "examples_per_s": self.examples_per_s}


def make_accelerator(mixed_precision: MixedPrecision, seed: int) -> Accelerator:
    """An Accelerator with `mixed_precision` autocast on GPU (fp32 on CPU) and seeded data order."""
    precision = mixed_precision.value if torch.cuda.is_available() else MixedPrecision.fp32.value
    if precision != mixed_precision.value:
        log.info("mixed_precision=%s needs a GPU; running in fp32", mixed_precision.value)
    return Accelerator(
        mixed_precision="no" if precision == MixedPrecision.fp32.value else precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
    )


def total_steps(steps_per_epoch: int, epochs: float, max_steps: int | None) -> int:
    """Steps of a stage: `epochs` passes over the loader, capped by `max_steps`."""
    steps = max(1, math.ceil(steps_per_epoch * epochs))
    return steps if max_steps is None else min(steps, max_steps)


def decay_groups(params: Iterable[nn.Parameter], weight_decay: float, **extra: Any) -> list[dict[str, Any]]:
    """Optimiser groups with weight decay on matrices only: biases and LayerNorm (1-d) get none (BERT's
    recipe); `extra` (e.g. lr) goes into both groups. Empty groups are left out."""
    params = list(params)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, **extra},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **extra}]
    return [g for g in groups if g["params"]]


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, without weight decay on biases and LayerNorm."""
    return torch.optim.AdamW(decay_groups((p for p in model.parameters() if p.requires_grad), weight_decay), lr=lr)


def linear_warmup(optimizer: torch.optim.Optimizer, steps: int, warmup_ratio: float):
    """Linear warmup over `warmup_ratio * steps`, then linear decay to 0 at `steps`."""
    return get_linear_schedule_with_warmup(optimizer, round(warmup_ratio * steps), steps)


def supervised_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accelerator: Accelerator,
    max_grad_norm: float = 1.0,
) -> StepFn:
    """One optimiser step on the loss the Hugging Face model computes from the batch's labels."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step(batch: Mapping[str, torch.Tensor], step: int) -> dict[str, float]:
        model.train()
        loss = model(**batch).loss
        accelerator.backward(loss)
        out = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0]}
        if max_grad_norm > 0:
            out["grad_norm"] = float(accelerator.clip_grad_norm_(params, max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return out

    return step


class _SharedInputQuantizers(logging.Filter):
    """Q, K and V share one input quantizer (supernet), so every saved train state holds tensors under several
    names and accelerate warns, at each save, that it dropped the aliases and to check the reload. It is expected,
    and a resumed run equals an uninterrupted one (tests/test_loop.py, tests/test_stages.py), so the warning is
    dropped rather than printed thousands of times over a comparison."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()  # accelerate prefixes "[RANK 0] "


logging.getLogger("accelerate.utils.other").addFilter(_SharedInputQuantizers())


def save_train_state(accelerator: Accelerator, state_dir: Path, step: int) -> None:
    """Everything `accelerator` checkpoints, plus the step, written atomically to `state_dir`."""
    tmp = state_dir.with_name(state_dir.name + ".tmp")  # not temp_beside: every process must name the same folder
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step}) + "\n")
        replace_dir(tmp, state_dir)
    accelerator.wait_for_everyone()
    log.info("saved train state at step %d to %s", step, state_dir)


def load_train_state(accelerator: Accelerator, state_dir: Path) -> int | None:
    """Restore the latest train state under `state_dir`; its step, or None when there is none."""
    found = saved_train_state(state_dir)
    if found is None:
        return None
    accelerator.load_state(str(found))
    step = int(json.loads((found / STATE_FILE).read_text())["step"])
    log.info("resumed from %s at step %d", found, step)
    return step


class Endless:
    """A loader's batches as one endless sequence (a new epoch each time it runs out), read by position:
    `at(n)` is the n-th batch drawn, the same whether or not the run was interrupted before it. Epoch e of a
    seedable loader is shuffled with seed + e (`set_epoch`), and a position inside an epoch is reached by
    skipping (`skip(loader, k)`: accelerate's skip_first_batches for a prepared loader), so a resumed run
    draws the batches an uninterrupted one would. `next()` draws the batch after the last. `train` reads the
    training loader this way, the search its architecture half."""

    def __init__(self, loader, skip: Callable[..., Any] | None = None,
                 empty: str = "the training loader yields no batches") -> None:
        self.loader, self.per_epoch = loader, len(loader)
        if self.per_epoch == 0:
            raise ValueError(empty)
        self.skip = skip or (lambda batches, k: itertools.islice(batches, k, None))
        self.position, self._batches = 0, None

    def at(self, index: int) -> Any:
        epoch, offset = divmod(index, self.per_epoch)
        if self._batches is None or index != self.position or offset == 0:
            if self._batches is not None and index == self.position:
                next(self._batches, None)  # run out the finished epoch: a prepared loader closes it, as a for loop
            if hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(epoch)  # the seedable sampler shuffles epoch e with seed + e
            self._batches = iter(self.skip(self.loader, offset) if offset else self.loader)
        self.position = index + 1
        return next(self._batches)

    def __iter__(self) -> "Endless":
        return self

    def __next__(self) -> Any:
        return self.at(self.position)


def train(
    step_fn: StepFn,
    loader: Iterable[Any],
    accelerator: Accelerator,
    steps: int,
    *,
    log_fn: LogFn | None = None,
    eval_fn: Callable[[], Mapping[str, float]] | None = None,
    eval_every: int = 0,
    state_dir: Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    log_every: int = 10,
    progress: bool = True,
    desc: str = "train",
) -> LoopResult:
    """Run `step_fn` over `loader` (prepared by `accelerator`) until `steps` steps are done.

    `log_fn(metrics, step)` gets every step's scalars (plus `epoch`) and the periodic evaluations
    (`eval_fn()`, every `eval_every` steps before the last: the stage evaluates the final model itself).
    With `state_dir`, the train state is saved every `checkpoint_every` steps and at the end; with
    `resume`, training continues from the state found there (from 0, with a warning, if none is).
    """
    batches = Endless(loader, accelerator.skip_first_batches)
    steps_per_epoch = batches.per_epoch
    step = 0
    if resume:
        restored = load_train_state(accelerator, state_dir) if state_dir is not None else None
        if restored is None:
            log.warning("resume=true but no train state in %s; starting from step 0", state_dir)
        step = restored or 0
    start_step, examples, last_eval = step, 0, None
    bar = progress_bar(total=steps, initial=step, desc=desc, dynamic_ncols=True, progress=progress,
                       main=accelerator.is_local_main_process)
    start = time.perf_counter()
    while step < steps:
        batch = batches.at(step)
        metrics = dict(step_fn(batch, step))
        step += 1
        examples += batch_size(batch) * accelerator.num_processes
        metrics["epoch"] = step / steps_per_epoch
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "lr")})
        if log_fn is not None:
            log_fn(metrics, step)
        if step % log_every == 0 or step == steps:  # per-site detail (a/b/c) goes to the tracker only
            log.info("step %d/%d %s", step, steps,
                     " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.count("/") < 2))
        if eval_fn is not None and eval_every and step % eval_every == 0 and step < steps:
            last_eval = dict(eval_fn())
            log.info("step %d eval %s", step, last_eval)
            if log_fn is not None:
                log_fn(last_eval, step)
        if state_dir is not None and checkpoint_every and step % checkpoint_every == 0 \
                and step < steps:
            save_train_state(accelerator, state_dir, step)
    bar.close()
    wall = time.perf_counter() - start
    if state_dir is not None and step > start_step:
        save_train_state(accelerator, state_dir, step)
    return LoopResult(step, start_step, step / steps_per_epoch, wall, examples, last_eval)


def batch_size(batch: Any) -> int:
    """Examples in a batch: the first dimension of its first tensor with one (0 when there is none)."""
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    return 0
