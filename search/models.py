"""Hugging Face models at the stage boundary: the task model per task kind, its tokenizer, and the
checkpoint a stage hands to the next.

The head follows the task kind (`search.tasks.TaskKind`): sequence classification (with the label
names; `problem_type` regression and one output for STS-B), token classification for CoNLL-03 (IOB2
`id2label`), extractive QA (start/end logits) for SQuAD. A plain `BertModel` checkpoint such as MiniLM
loads with a newly initialised head. A checkpoint is `save_pretrained` model + tokenizer plus
`bert_mpq.json` naming its task, written to a temporary directory and renamed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from search.errors import UserError, first_line
from search.rundir import replace_dir, temp_beside
from search.tasks import TaskKind, TaskSpec, get_task
from supernet import SearchSpace, to_supernet
from supernet.files import follow_umask

__all__ = ["MODEL_CLASSES", "TASK_FILE", "check_local", "load_tokenizer", "load_task_model", "require_task_head",
           "save_checkpoint"]

log = logging.getLogger(__name__)

MODEL_CLASSES = {
    TaskKind.CLASSIFICATION: AutoModelForSequenceClassification,
    TaskKind.REGRESSION: AutoModelForSequenceClassification,
    TaskKind.TOKEN_CLASSIFICATION: AutoModelForTokenClassification,
    TaskKind.QUESTION_ANSWERING: AutoModelForQuestionAnswering,
}
TASK_FILE = "bert_mpq.json"  # which task a checkpoint was fine-tuned on


def check_local(name_or_path: str, what: str = "model.name_or_path") -> None:
    """A value that is clearly a path (absolute, ./, ../, ~) must be an existing directory."""
    path = Path(name_or_path).expanduser()
    if (path.is_absolute() or name_or_path.startswith((".", "~"))) and not path.is_dir():
        raise UserError(
            f"{what}={name_or_path}: no such directory; point it at a saved model "
            f"(e.g. <run_dir>/checkpoint of a finetune run) or use a hub id"
        )



def load_tokenizer(name_or_path: str) -> Any:
    """The fast tokenizer saved with `name_or_path` (word ids and offsets need a fast one)."""
    check_local(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(str(Path(name_or_path).expanduser()), use_fast=True)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load a tokenizer from {name_or_path!r} ({first_line(e)}); set "
            f"model.name_or_path to a hub id or a local directory that holds a model and its tokenizer"
        ) from e


def _head_kwargs(spec: TaskSpec) -> dict[str, Any]:
    if spec.kind is TaskKind.QUESTION_ANSWERING:
        return {}
    if spec.kind is TaskKind.REGRESSION:
        return {"num_labels": 1, "problem_type": "regression"}
    kwargs: dict[str, Any] = {
        "num_labels": spec.num_labels,
        "id2label": dict(enumerate(spec.label_names)),
        "label2id": spec.label_to_id,
    }
    if spec.kind is TaskKind.CLASSIFICATION:
        kwargs["problem_type"] = "single_label_classification"
    return kwargs


def _check_head(name_or_path: str, spec: TaskSpec) -> bool:
    """A checkpoint fine-tuned on another task has a head of another shape: say so before loading. Whether it
    has a task head at all."""
    task_file = Path(name_or_path).expanduser() / TASK_FILE
    if task_file.is_file():
        trained_on = json.loads(task_file.read_text()).get("task")
        if trained_on and trained_on != spec.name:
            raise UserError(
                f"{name_or_path} was fine-tuned on task {trained_on!r}, not {spec.name!r}; "
                f"pass task={trained_on} or a checkpoint of task {spec.name}"
            )
    try:
        config = AutoConfig.from_pretrained(str(Path(name_or_path).expanduser()))
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load a model config from {name_or_path!r} ({first_line(e)}); set "
            f"model.name_or_path (or eval.checkpoint) to a hub id or a directory with config.json"
        ) from e
    heads = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
    has_head = any(a.endswith(heads) for a in (config.architectures or []))
    if has_head and spec.kind is not TaskKind.QUESTION_ANSWERING and config.num_labels != spec.num_labels:
        raise UserError(
            f"{name_or_path} has a head with {config.num_labels} outputs but task {spec.name!r} "
            f"needs {spec.num_labels}; use a checkpoint fine-tuned on {spec.name}"
        )
    return has_head


def require_task_head(name_or_path: str, task: str) -> None:
    """`model.finetuned=true` skips fine-tuning: the checkpoint must carry `task`'s head, since a bare encoder
    would get a random one and every method would be measured on it."""
    check_local(name_or_path)
    if not _check_head(name_or_path, get_task(task)):
        raise UserError(f"model.finetuned=true, but {name_or_path} has no task head (a bare encoder); drop "
                        f"model.finetuned to fine-tune it on {task} first, or give a checkpoint fine-tuned on {task}")


def load_task_model(name_or_path: str, task: str) -> PreTrainedModel:
    """The Hugging Face model with `task`'s head, in fp32 (the head is new for a bare encoder)."""
    spec = get_task(task)
    check_local(name_or_path)
    _check_head(name_or_path, spec)
    try:
        model = MODEL_CLASSES[spec.kind].from_pretrained(
            str(Path(name_or_path).expanduser()), dtype=torch.float32, **_head_kwargs(spec)
        )
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a truncated model.safetensors
        raise UserError(
            f"cannot load {name_or_path!r} as a {spec.kind.value} model ({first_line(e)}); set "
            f"model.name_or_path to a BERT checkpoint (hub id or local directory)"
        ) from e
    log.info("loaded %s for %s (%s)", name_or_path, task, type(model).__name__)
    return model


def convert(net: PreTrainedModel, space: SearchSpace, source: str) -> PreTrainedModel:
    """`supernet.to_supernet`, with a space the model cannot take (groups that do not divide a matrix, a
    layout that is not BERT's) as a one-line UserError that names the model."""
    try:
        return to_supernet(net, space)
    except (ValueError, TypeError) as e:
        raise UserError(f"cannot convert {source} with this space: {e}") from e


def save_checkpoint(
    model: torch.nn.Module, tokenizer: Any, target: Path, task: str, accelerator: Accelerator | None = None
) -> Path:
    """`save_pretrained` model and tokenizer into `target`, atomically; returns `target`."""
    main = accelerator is None or accelerator.is_main_process
    if accelerator is not None:
        accelerator.wait_for_everyone()
        model = accelerator.unwrap_model(model)
    if main:
        tmp = temp_beside(target)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / TASK_FILE).write_text(json.dumps({"task": task}) + "\n")
        follow_umask(tmp)  # safetensors writes 0600
        replace_dir(tmp, target)
        log.info("saved checkpoint to %s", target)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return target
