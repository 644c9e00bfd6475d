"""The data a stage runs on: the splits loaded and validated, evaluation splits capped, tokenised (with
the on-disk cache), and the loaders over them.

Evaluation splits are capped *before* tokenisation (`max_eval_examples` counts questions, not SQuAD
windows), and an `EvalSet` keeps the raw rows and the tokenised windows next to its loader, because
SQuAD's answer post-processing maps window logits back to the question text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from datasets import Dataset
from torch.utils.data import DataLoader

from search.config import EvalConfig, TaskConfig
from search.data import load_raw, make_loader, tokenize
from search.tasks import TaskKind, get_task

__all__ = ["EvalSet", "eval_split_names", "load_splits", "eval_sets", "task_data"]

TRAIN = "train"


@dataclass
class EvalSet:
    """One evaluated split; `examples`/`features` are set for QA (raw questions, tokenised windows)."""

    split: str
    loader: DataLoader
    size: int  # examples (questions for QA)
    examples: Dataset | None = None
    features: Dataset | None = None


def eval_split_names(task: str, extra: Iterable[str] = ()) -> list[str]:
    """The task's dev split(s), then `extra` splits (e.g. SST-2's `test_labeled`), without repeats."""
    return list(dict.fromkeys([*get_task(task).dev_splits, *extra]))


def load_splits(
    task: TaskConfig,
    tokenizer: Any,
    splits: Iterable[str],
    cache_dir: str | None,
    max_eval_examples: int | None = None,
) -> tuple[dict[str, Dataset], dict[str, Dataset]]:
    """(raw, tokenised) splits of `task`; every split but `train` keeps its first `max_eval_examples`."""
    data_dir = None if task.data_dir is None else Path(task.data_dir).expanduser()
    raw = load_raw(task.name, data_dir, list(splits))
    if max_eval_examples is not None:
        raw = {split: ds if split == TRAIN else ds.select(range(min(max_eval_examples, len(ds))))
               for split, ds in raw.items()}
    cache = None if cache_dir is None else Path(cache_dir).expanduser()
    tokenized = tokenize(raw, task.name, tokenizer, task.max_seq_len, cache, doc_stride=task.doc_stride)
    return raw, tokenized


def eval_sets(
    raw: dict[str, Dataset],
    tokenized: dict[str, Dataset],
    task: str,
    tokenizer: Any,
    batch_size: int,
    splits: Iterable[str],
) -> list[EvalSet]:
    """Unshuffled loaders over `splits`, in order."""
    qa = get_task(task).kind is TaskKind.QUESTION_ANSWERING
    out = []
    for split in splits:
        loader = make_loader(tokenized[split], tokenizer, batch_size, shuffle=False, seed=0)
        out.append(EvalSet(
            split=split,
            loader=loader,
            size=len(raw[split]),
            examples=raw[split] if qa else None,
            features=tokenized[split] if qa else None,
        ))
    return out


def task_data(
    task: TaskConfig,
    tokenizer: Any,
    evaluation: EvalConfig,
    cache_dir: str | None,
    max_eval_examples: int | None = None,
    *,
    train: bool,
) -> tuple[dict[str, Dataset], list[EvalSet]]:
    """What a stage needs: the tokenised splits (with `train` when asked) and the evaluation loaders over
    the dev split(s) and `evaluation.splits`."""
    name = get_task(task.name).name
    splits = eval_split_names(name, evaluation.splits)
    raw, tokenized = load_splits(task, tokenizer, [TRAIN, *splits] if train else splits, cache_dir, max_eval_examples)
    return tokenized, eval_sets(raw, tokenized, name, tokenizer, evaluation.batch_size, splits)
