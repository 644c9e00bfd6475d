"""The `pipeline` stage: finetune -> search -> derive -> qat -> eval, in one command; with `pipeline.hawq=true`
also HAWQ-V2 at the searched architecture's exact size -> the same QAT (`hawq/`, `hawq_qat/`).

Each step runs in its own sub-directory of the run directory (`finetune/`, `search/`, `qat/`): a step
whose metrics.json exists is skipped, one with a train state resumes, so an interrupted pipeline
continues with `resume=true` where it stopped. Fine-tuning is skipped when `model.name_or_path` is already
fine-tuned on the task. The budget is checked against the space before anything runs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from supernet import Architecture

from .budget import Budget, check_bitops_target, site_candidates
from .config import BudgetConfig, Config, ModelConfig, QatInit, Stage
from .dnas import run_search
from .finetune import finetune
from .hawq_stage import check_hawq_settings, run_hawq
from .models import TASK_FILE, convert, load_task_model, load_tokenizer, require_task_head
from .prepare import TRAIN, eval_split_names, load_splits
from .qat import SUPERNET_STATE, run_qat
from .rundir import RunDir, run_step
from .tasks import get_task

__all__ = ["run_pipeline", "hawq_steps", "qat_step", "finetuned_on", "fine_tuned_model", "common_args", "check_up_front",
           "kept_state"]

log = logging.getLogger(__name__)


def finetuned_on(name_or_path: str, task: str) -> bool:
    """True when `name_or_path` is a local checkpoint our finetune stage wrote for `task`."""
    path = Path(name_or_path).expanduser() / TASK_FILE
    return path.is_file() and json.loads(path.read_text()).get("task") == task


def check_up_front(c: Config, budgets: Sequence[Budget], hawq: bool, search: bool = True) -> Architecture:
    """Bad input fails now, before the run directory is written, not after fine-tuning and an hour of search: the
    task's data (read and tokenised as every step will, into the cache they reuse), HAWQ-V2's settings when `hawq`
    runs, impossible budgets, and an unreachable bit-operations target when a `search` runs. Returns the architecture
    skeleton of `c.model` converted with `c.space` (its sites and groups, at the argmax of fresh logits)."""
    if hawq:
        check_hawq_settings(c.hawq, c.space)
    if c.model.finetuned:
        require_task_head(c.model.name_or_path, c.task.name)
    load_splits(c.task, load_tokenizer(c.model.name_or_path), [TRAIN, *eval_split_names(c.task.name, c.eval.splits)],
                c.cache_dir, c.max_eval_examples)
    net = convert(load_task_model(c.model.name_or_path, c.task.name), c.space, c.model.name_or_path)
    skeleton = Architecture.from_supernet(net)
    candidates = site_candidates(net)
    for budget in budgets:
        budget.check_reachable(skeleton, candidates)
    if search:
        check_bitops_target(c.search.bitops_target, skeleton, candidates, c.space.a_bits)
    return skeleton


def common_args(c: Config, **override: Any) -> dict[str, Any]:
    """The arguments every training stage takes from the top of the config."""
    args = dict(seed=c.seed, max_steps=c.max_steps, max_eval_examples=c.max_eval_examples,
                mixed_precision=c.mixed_precision, cache_dir=c.cache_dir, progress_bar=c.progress_bar)
    return {**args, **override}


def kept_state(c: Config, *names: str) -> tuple[str, ...] | None:
    """`run_step`'s `keep` for a step of `c`: all of a finished step's train state with `keep_train_state`,
    else only the files `names` (a search's final weights, which `qat.init=supernet` starts from)."""
    return None if c.keep_train_state else names


def fine_tuned_model(c: Config, run: RunDir, results: dict[str, Any]) -> ModelConfig:
    """`c.model` when it is fine-tuned on the task already (`model.finetuned`, by default its bert_mpq.json), else
    the checkpoint of a `finetune/` step of `run`."""
    checkpoint = c.model.name_or_path
    told = c.model.finetuned
    if told or (told is None and finetuned_on(checkpoint, c.task.name)):
        log.info("%s is fine-tuned on %s already (%s); no finetune step", checkpoint, c.task.name,
                 "model.finetuned=true" if told else "its bert_mpq.json")
        return c.model
    results["finetune"] = run_step(run, "finetune", lambda r, resume: finetune(
        c.model, c.task, c.finetune, c.eval, r, resume=resume, **common_args(c)), keep=kept_state(c),
        config=dataclasses.replace(c, stage=Stage.finetune))
    return ModelConfig(name_or_path=str(run.path / "finetune" / "checkpoint"))


def qat_step(c: Config, run: RunDir, name: str, model: ModelConfig, architecture: Path, seed: int,
             settings: Sequence[str] = (), searched: bool = False) -> dict[str, Any]:
    """The QAT of `architecture` into `run/name` (see `run_step` for `settings`); `qat.init=supernet` applies
    only to a `searched` architecture: the baselines have no supernet and start from the checkpoint."""
    init = c.qat.init if searched else QatInit.checkpoint
    qat_cfg = dataclasses.replace(c.qat, architecture=str(architecture), init=init)
    return run_step(run, name, lambda r, resume: run_qat(
        model, c.task, c.space, qat_cfg, c.eval, r, resume=resume, **common_args(c, seed=seed)), settings,
        keep=kept_state(c), config=dataclasses.replace(c, stage=Stage.qat, model=model, qat=qat_cfg, seed=seed))


def hawq_steps(c: Config, run: RunDir, prefix: str, model: ModelConfig, budget: BudgetConfig, seed: int,
               settings: tuple[Sequence[str], Sequence[str]] = ((), ())) -> tuple[dict[str, Any], dict[str, Any]]:
    """HAWQ-V2 under `budget` into `run/<prefix>hawq`, then the QAT of its architecture into `<prefix>hawq_qat`;
    `settings` are the config sections each step's result depends on (see `run_step`)."""
    hawq = run_step(run, f"{prefix}hawq", lambda r, resume: run_hawq(
        model, c.task, c.space, c.hawq, budget, c.eval, r, seed=seed, max_eval_examples=c.max_eval_examples,
        mixed_precision=c.mixed_precision, cache_dir=c.cache_dir, progress_bar=c.progress_bar), settings[0],
        config=dataclasses.replace(c, stage=Stage.hawq, model=model, budget=budget, seed=seed))
    return hawq, qat_step(c, run, f"{prefix}hawq_qat", model, run.path / f"{prefix}hawq" / "architecture.json", seed,
                          settings[1])


def run_pipeline(c: Config, run: RunDir) -> dict[str, Any]:
    """Run every step into `run`'s sub-directories; returns (and writes) the summary."""
    spec = get_task(c.task.name)
    budget = Budget.from_args(c.budget.avg_bits, c.budget.mb, c.budget.scope, c.budget.match)
    check_up_front(c, [] if budget is None else [budget], c.pipeline.hawq)
    run.open()  # inputs checked: from here run.log keeps the steps' headers, and the directory is locked
    common = common_args(c)
    results: dict[str, Any] = {}
    model = fine_tuned_model(c, run, results)
    results["search"] = run_step(run, "search", lambda r, resume: run_search(
        model, c.task, c.space, c.search, c.budget, c.eval, r, resume=resume, **common),
        keep=kept_state(c, SUPERNET_STATE.name), config=dataclasses.replace(c, stage=Stage.search, model=model))
    results["qat"] = qat_step(c, run, "qat", model, run.path / "search" / "architecture.json", c.seed, searched=True)
    if c.pipeline.hawq:  # the baseline at exactly the searched architecture's size, through the same QAT
        match = BudgetConfig(match=str(run.path / "search" / "architecture.json"), scope=c.budget.scope)
        results["hawq"], results["hawq_qat"] = hawq_steps(c, run, "", model, match, c.seed)

    summary = {
        "stage": "pipeline",
        "task": spec.name,
        "checkpoint": model.name_or_path,
        "steps": {name: {"main_metric": r.get("main_metric"), "dir": str(run.path / name)} for name, r in results.items()},
        "architecture": results["qat"]["architecture"],
        "main_metric": results["qat"]["main_metric"],
        "split": results["qat"]["split"],
        "splits": results["qat"]["splits"],
        "quantized": results["qat"]["quantized"],
    }
    run.write_json("metrics.json", summary)
    return summary
