"""Evaluation of a model on a task, and the `eval` stage.

`evaluate(model, loader, task)` runs any model with a Hugging Face task head (FP, or later a quantized
one built by another stage) over an unshuffled loader and scores it with `search.metrics`:
classification (argmax), regression (the single output), NER (per-token argmax, decoded with
`ids_to_tags` and scored by seqeval) and extractive QA (window logits -> answer text by
`postprocess_qa`, scored with SQuAD v1.1 EM/F1). With an accelerator, predictions are gathered from
every process (`gather_for_metrics` drops the duplicates that even batches add).

The `eval` stage loads `eval.checkpoint` (or the model config), evaluates the dev split(s) plus
`eval.splits` and writes `metrics.json`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from search.config import EvalConfig, MixedPrecision, ModelConfig, TaskConfig
from search.errors import UserError
from search.loop import make_accelerator
from search.metrics import compute_metrics, ids_to_tags, postprocess_qa, squad_references
from search.models import load_task_model, load_tokenizer
from search.data import make_loader
from search.prepare import TRAIN, EvalSet, task_data
from search.progress import progress_bar
from search.quantized import load_any_quantized, load_architecture, quantize_user_model
from search.rundir import RunDir
from search.tasks import TaskKind, TaskSpec, get_task
from supernet import SearchSpace, is_packed_dir, read_manifest

__all__ = ["evaluate", "evaluate_sets", "main_metric_name", "scalars", "run_eval", "warn_one_class"]

log = logging.getLogger(__name__)

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _gather(t: torch.Tensor, accelerator: Accelerator | None, pad_index: float | None = None) -> np.ndarray:
    if accelerator is not None:
        if pad_index is not None:  # rows of another process may be padded to another length
            t = accelerator.pad_across_processes(t, dim=1, pad_index=pad_index)
        t = accelerator.gather_for_metrics(t)
    return t.detach().float().cpu().numpy() if t.is_floating_point() else t.detach().cpu().numpy()


def _rows(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Batches of [B, L_batch] -> one row per example (lengths differ between batches)."""
    return [row for array in arrays for row in array]


def _sentence(outputs: list[dict[str, np.ndarray]], spec: TaskSpec, **_: Any) -> tuple[Any, Any]:
    preds = np.concatenate([o["preds"] for o in outputs])
    refs = np.concatenate([o["labels"] for o in outputs])
    return preds, refs


def _ner(outputs: list[dict[str, np.ndarray]], spec: TaskSpec, **_: Any) -> tuple[Any, Any]:
    preds = _rows([o["preds"] for o in outputs])
    labels = _rows([o["labels"] for o in outputs])
    return ids_to_tags(preds, labels, spec.label_names)


def _qa(outputs: list[dict[str, np.ndarray]], spec: TaskSpec, examples: Any, features: Any) -> tuple[Any, Any]:
    if examples is None or features is None:
        raise ValueError("QA evaluation needs the raw examples and the tokenised features of the split")
    starts = _rows([o["start"] for o in outputs])
    ends = _rows([o["end"] for o in outputs])
    return postprocess_qa(examples, features, starts, ends), squad_references(examples)


def _batch_outputs(spec: TaskSpec, out: Any, batch: Mapping[str, torch.Tensor],
                   accelerator: Accelerator | None) -> dict[str, np.ndarray]:
    kind = spec.kind
    if kind is TaskKind.QUESTION_ANSWERING:
        # Padding beyond a window is cut off by postprocess_qa (it reads len(offsets) positions).
        return {"start": _gather(out.start_logits, accelerator, pad_index=-1e4),
                "end": _gather(out.end_logits, accelerator, pad_index=-1e4)}
    if kind is TaskKind.REGRESSION:
        preds = out.logits[..., 0]
    else:
        preds = out.logits.argmax(-1)
    pad = -100 if kind is TaskKind.TOKEN_CLASSIFICATION else None
    return {"preds": _gather(preds, accelerator, pad), "labels": _gather(batch["labels"], accelerator, pad)}


_SCORERS: dict[TaskKind, Callable[..., tuple[Any, Any]]] = {
    TaskKind.CLASSIFICATION: _sentence,
    TaskKind.REGRESSION: _sentence,
    TaskKind.TOKEN_CLASSIFICATION: _ner,
    TaskKind.QUESTION_ANSWERING: _qa,
}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, torch.Tensor]],
    task: str,
    *,
    split: str | None = None,
    examples: Any = None,
    features: Any = None,
    accelerator: Accelerator | None = None,
) -> dict[str, float]:
    """The metrics of `task` (percent) for `model` over `loader`; leaves the model in eval mode.

    Without an accelerator, batches are moved to the model's device. For QA pass the split's raw
    `examples` and tokenised `features` (rows aligned with the loader). `split` names the metrics
    (MNLI: `_m` / `_mm`).
    """
    spec = get_task(task)
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    main = accelerator is None or accelerator.is_local_main_process
    for batch in progress_bar(loader, main=main, desc=f"eval {split or task}", leave=False, dynamic_ncols=True):
        if accelerator is None:
            batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**{k: v for k, v in batch.items() if k in _INPUTS})
        outputs.append(_batch_outputs(spec, out, batch, accelerator))
    if not outputs:
        raise ValueError(f"nothing to evaluate: the {split or 'evaluation'} loader is empty")
    predictions, references = _SCORERS[spec.kind](outputs, spec, examples=examples, features=features)
    if spec.kind is TaskKind.CLASSIFICATION:
        warn_one_class(predictions, references, task, split)
    return compute_metrics(task, predictions, references, split=split)


# share of one predicted class above which a classifier is reported as (nearly) constant
ONE_CLASS_SHARE = 0.97


def warn_one_class(preds: np.ndarray, labels: np.ndarray, task: str, split: str | None) -> bool:
    """Warn when a classifier gives (nearly) every example the same class although the labels are mixed.

    A quantised model that did not recover from quantisation often ends there, and its score (MRPC's
    all-positive F1 is 81.2) can look like a result; the warning names the class and both shares.
    """
    values, counts = np.unique(preds, return_counts=True)
    top, share = values[counts.argmax()], counts.max() / len(preds)
    label_share = float(np.mean(labels == top))
    if share < ONE_CLASS_SHARE or label_share >= ONE_CLASS_SHARE:
        return False
    log.warning("%s %s: %.1f%% of the predictions are class %s, which %.1f%% of the labels are: the model "
                "(nearly) always predicts one class; its score is that of a constant classifier",
                task, split or "evaluation", 100 * share, top, 100 * label_share)
    return True


def main_metric_name(task: str, metrics: Mapping[str, float]) -> str:
    """The task's main metric as named in `metrics` (MNLI mismatched reports `accuracy_mm`)."""
    spec = get_task(task)
    if spec.main_metric in metrics:
        return spec.main_metric
    return next(name for name in spec.metrics if name in metrics)


def evaluate_sets(
    model: nn.Module, sets: Iterable[EvalSet], task: str, accelerator: Accelerator | None = None
) -> dict[str, dict[str, Any]]:
    """Per split: metrics, the main metric, example count, wall time and examples/s."""
    results = {}
    for s in sets:
        start = time.perf_counter()
        metrics = evaluate(model, s.loader, task, split=s.split, examples=s.examples,
                           features=s.features, accelerator=accelerator)
        wall = time.perf_counter() - start
        name = main_metric_name(task, metrics)
        results[s.split] = {
            "metrics": metrics,
            "main_metric": {"name": name, "value": metrics[name]},
            "examples": s.size,
            "wall_s": wall,
            "examples_per_s": s.size / wall if wall > 0 else 0.0,
        }
        log.info("%s %s: %s (%d examples, %.1f/s)", task, s.split,
                 " ".join(f"{k} {v:.2f}" for k, v in metrics.items()), s.size, results[s.split]["examples_per_s"])
    return results


def scalars(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """`evaluate_sets` results as flat `split/metric` scalars, for `log(metrics, step)`."""
    return {f"{split}/{name}": value for split, r in results.items() for name, value in r["metrics"].items()}


def stage_metrics(stage: str, task: str, model: str, results: Mapping[str, Mapping[str, Any]],
                  **extra: Any) -> dict[str, Any]:
    """The common head of every stage's metrics.json: the first evaluated split is the main one."""
    split = next(iter(results))
    return {"stage": stage, "task": task, "model": model, "split": split,
            "main_metric": results[split]["main_metric"], **extra, "splits": dict(results)}


@torch.no_grad()
def set_activation_steps(net: nn.Module, batch: Mapping[str, torch.Tensor], device: torch.device) -> None:
    """Run a quantized model's first forward, which sets its fresh activation steps, on training `batch`: as QAT's
    first step does, not on the dev data it is then scored on."""
    net.eval()(**{k: v.to(device) for k, v in batch.items()})


def run_eval(
    model: ModelConfig,
    task: TaskConfig,
    evaluation: EvalConfig,
    run: RunDir,
    *,
    seed: int,
    max_eval_examples: int | None,
    mixed_precision: MixedPrecision,
    cache_dir: str | None,
    space: SearchSpace | None = None,
) -> dict[str, Any]:
    """The `eval` stage: evaluate `evaluation.checkpoint` (or `model`), quantized to `evaluation.architecture`
    (with `space`'s quantizers) when that is set, and write metrics.json."""
    source = evaluation.checkpoint or model.name_or_path
    # A checkpoint is always a local directory (a hub id goes into model.name_or_path).
    if evaluation.checkpoint is not None and not Path(evaluation.checkpoint).expanduser().is_dir():
        raise UserError(f"eval.checkpoint={evaluation.checkpoint}: no such directory; pass the "
                        f"checkpoint/ folder of a finetune run, the quantized/ folder of a qat run or an exported packed/ folder")
    spec = get_task(task.name)
    sizes = None
    quantized = load_any_quantized(source)  # a qat run's quantized/ or an exported packed/ folder
    if quantized is not None:
        net, arch, trained_on = quantized
        if trained_on != spec.name:
            raise UserError(f"{source} was trained on {trained_on}, not {spec.name}; set task={trained_on}")
        sizes = arch.summary()
    else:
        net = load_task_model(source, spec.name)
    if evaluation.architecture is not None:
        if quantized is not None:
            raise UserError(f"eval.architecture applies to an FP checkpoint, and {source} is quantized already; "
                            f"pass a finetune run's checkpoint/ (or unset eval.architecture)")
        arch = load_architecture(evaluation.architecture, "eval.architecture")
        quantize_user_model(net, arch, space or SearchSpace(), evaluation.architecture, source)
        sizes = arch.summary()
    tokenizer = load_tokenizer(source)  # after the model: a corrupt folder is reported as such
    calibrate = evaluation.architecture is not None  # fresh activation steps: set them on training data
    tokenized, sets = task_data(task, tokenizer, evaluation, cache_dir, max_eval_examples, train=calibrate)
    accelerator = make_accelerator(mixed_precision, seed)

    run.main_process = accelerator.is_main_process
    run.open()
    net = accelerator.prepare(net)
    if calibrate:
        set_activation_steps(net, next(iter(make_loader(tokenized[TRAIN], tokenizer, evaluation.batch_size, True, seed))),
                             accelerator.device)
    for s in sets:
        s.loader = accelerator.prepare(s.loader)
    results = evaluate_sets(net, sets, spec.name, accelerator)
    extra: dict[str, Any] = {"architecture": sizes} if sizes else {}
    if evaluation.architecture is not None:
        extra["architecture_file"] = evaluation.architecture
    if is_packed_dir(source):  # what the shipped folder takes on disk (checked against its manifest on load)
        extra["packed_size"] = read_manifest(source)["size"]
    metrics = stage_metrics("eval", spec.name, source, results, **extra)
    run.write_json("metrics.json", metrics)
    run.logger.summary({"eval": results})
    return metrics
