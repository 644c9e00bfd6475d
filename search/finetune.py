"""The `finetune` stage: full-precision fine-tuning of a pretrained checkpoint on one task.

BERT's recipe (arXiv:1810.04805): AdamW (no decay on biases and LayerNorm), linear warmup then linear
decay, gradient clipping, a few epochs; `max_steps` caps it. The result is the starting point of every
later stage: `<run_dir>/checkpoint/` (Hugging Face format, model + tokenizer) and `metrics.json` (dev
metrics of the final model, training steps, wall time, throughput).
"""

from __future__ import annotations

import logging
from typing import Any

from accelerate.utils import set_seed

from search.config import EvalConfig, FinetuneConfig, MixedPrecision, ModelConfig, TaskConfig
from search.data import make_loader
from search.evaluate import evaluate_sets, scalars, stage_metrics
from search.loop import adamw, linear_warmup, make_accelerator, supervised_step, total_steps, train
from search.models import load_task_model, load_tokenizer, save_checkpoint
from search.prepare import TRAIN, task_data
from search.rundir import RunDir
from search.tasks import get_task

__all__ = ["finetune"]

log = logging.getLogger(__name__)


def finetune(
    model: ModelConfig,
    task: TaskConfig,
    train_cfg: FinetuneConfig,
    evaluation: EvalConfig,
    run: RunDir,
    *,
    seed: int,
    max_steps: int | None = None,
    max_eval_examples: int | None = None,
    mixed_precision: MixedPrecision = MixedPrecision.fp32,
    cache_dir: str | None = None,
    resume: bool = False,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Fine-tune `model` on `task` into `run`; returns what metrics.json holds.

    Everything that can fail on bad input (task, model, tokenizer, data files, sequence length) is
    loaded before `run.open()` writes the first file.
    """
    spec = get_task(task.name)
    set_seed(seed)  # dropout and sampling follow this step's seed, not what ran before it in the process
    tokenizer = load_tokenizer(model.name_or_path)
    tokenized, sets = task_data(task, tokenizer, evaluation, cache_dir, max_eval_examples, train=True)
    net = load_task_model(model.name_or_path, spec.name)
    train_loader = make_loader(tokenized[TRAIN], tokenizer, train_cfg.batch_size, shuffle=True, seed=seed)
    accelerator = make_accelerator(mixed_precision, seed)

    run.main_process = accelerator.is_main_process
    run.open()
    optimizer = adamw(net, train_cfg.lr, train_cfg.weight_decay)
    net, optimizer, train_loader = accelerator.prepare(net, optimizer, train_loader)
    for s in sets:
        s.loader = accelerator.prepare(s.loader)
    steps = total_steps(len(train_loader), train_cfg.epochs, max_steps)
    # The schedule counts this process's steps; left unprepared (accelerate would step it once per
    # process) and registered so train_state/ holds it.
    scheduler = linear_warmup(optimizer.optimizer, steps, train_cfg.warmup_ratio)
    accelerator.register_for_checkpointing(scheduler)
    log.info("fine-tuning %s on %s: %d steps (%d per epoch), %d training examples",
             model.name_or_path, spec.name, steps, len(train_loader), len(tokenized[TRAIN]))

    result = train(
        supervised_step(net, optimizer, scheduler, accelerator, train_cfg.max_grad_norm),
        train_loader,
        accelerator,
        steps,
        log_fn=run.log,
        eval_fn=lambda: scalars(evaluate_sets(net, sets, spec.name, accelerator)),
        eval_every=train_cfg.eval_every,
        state_dir=run.train_state,
        checkpoint_every=train_cfg.checkpoint_every,
        resume=resume,
        log_every=train_cfg.log_every,
        progress=progress_bar,
    )
    save_checkpoint(net, tokenizer, run.checkpoint, spec.name, accelerator)
    results = evaluate_sets(net, sets, spec.name, accelerator)
    run.log(scalars(results), result.steps)
    metrics = stage_metrics("finetune", spec.name, model.name_or_path, results, train=result.summary(),
                            checkpoint=str(run.checkpoint))
    run.write_json("metrics.json", metrics)
    run.logger.summary({"eval": results, "train": metrics["train"]})
    return metrics
