"""The FP teacher's outputs over the training set, computed once and cached on disk, for distillation.

QAT distils from the FP model (search/qat.py), which runs in eval mode: its output for a training example
never changes. So instead of one teacher forward pass per example per epoch per QAT run (about a sixth of a
QAT step on a CPU), the outputs are computed in one pass over the training set and cached under
`cache_dir`, keyed by the teacher's weights and the tokenised examples: every QAT run of a comparison (three
methods x budgets x seeds on one checkpoint) then reads them. The training loader carries each example's
row number (`INDEX`), and a step looks its examples' outputs up.

Classification and regression keep one [C] row per example, token classification one [L_i, C] row padded
with zeros to the batch (the padding is outside the distillation mask, so the loss is unchanged).
Question answering keeps the live teacher: its distillation covers every position of the window, padding
included, which a row per example would not reproduce. So does hidden-state distillation.

The distillation loss itself lives here too: QAT adds it to the task loss, and so can the search
(`search.kd_weight`, `DistilledLoss`), so that both levels of the search see how far the supernet's outputs
moved from the FP model's on every example, not only on the ones the labels say it gets wrong.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn

from .data import INDEX, MODEL_COLUMNS, make_loader
from .progress import progress_bar
from .rundir import write_atomic
from .tasks import TaskKind

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_INPUTS = tuple(c for c in MODEL_COLUMNS if c not in ("labels", "start_positions", "end_positions"))


def cacheable(kind: TaskKind, hidden_weight: float) -> bool:
    """Whether a table can stand in for the live teacher: logits-only distillation outside QA."""
    return kind is not TaskKind.QUESTION_ANSWERING and hidden_weight == 0


@dataclass
class TeacherTable:
    """The teacher's logits per training example: [N, C] (or [N] for regression), or a list of [L_i, C]."""

    rows: torch.Tensor | list[torch.Tensor]

    def lookup(self, index: torch.Tensor, seq_len: int, device: torch.device) -> SimpleNamespace:
        """An output object like the teacher's for the examples `index` ([B]) of a batch padded to `seq_len`."""
        idx = index.tolist()
        if isinstance(self.rows, torch.Tensor):
            logits = self.rows[idx]
        else:
            logits = self.rows[0].new_zeros(len(idx), seq_len, self.rows[0].shape[-1])  # [B, T, C]
            for b, i in enumerate(idx):
                row = self.rows[i]
                logits[b, :row.shape[0]] = row
        return SimpleNamespace(logits=logits.to(device))


def with_index(ds: Dataset) -> Dataset:
    """`ds` with each row's number as a column, so a shuffled batch can find its rows in a table."""
    return ds.add_column(INDEX, list(range(len(ds))))


def fingerprint(teacher: nn.Module, ds: Dataset, kind: TaskKind) -> str:
    """A key over the teacher's weights and the model inputs of `ds` (not its labels)."""
    h = hashlib.sha256(f"v{CACHE_VERSION}:{kind.value}:{type(teacher).__name__}".encode())
    for name, t in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    table = ds.data.table
    indices = getattr(ds, "_indices", None)  # a select()ed or shuffled view of that table: which rows, in order
    if indices is not None:
        h.update(indices.column(0).to_numpy().tobytes())
    for col in _INPUTS:
        if col in table.column_names:
            arr = table.column(col).combine_chunks()
            h.update(col.encode())
            h.update(arr.offsets.to_numpy().tobytes())
            h.update(arr.values.to_numpy().tobytes())
    return h.hexdigest()[:24]


@torch.no_grad()
def compute(teacher: nn.Module, ds: Dataset, tokenizer: Any, kind: TaskKind, batch_size: int,
            device: torch.device, progress: bool = True) -> TeacherTable:
    """One pass of the (eval-mode) teacher over `ds` in order."""
    teacher.eval()
    loader = make_loader(ds, tokenizer, batch_size, shuffle=False, seed=0)
    rows: list[torch.Tensor] = []
    for batch in progress_bar(loader, desc="teacher outputs", progress=progress):
        batch = {k: v.to(device) for k, v in batch.items() if k in _INPUTS}
        logits = teacher(**batch).logits.float().cpu()
        if kind is TaskKind.TOKEN_CLASSIFICATION:
            lengths = batch["attention_mask"].sum(-1).tolist()
            rows += [logits[b, :n].clone() for b, n in enumerate(lengths)]  # [T, C] -> [L_i, C]
        else:
            rows.append(logits)
    return TeacherTable(rows if kind is TaskKind.TOKEN_CLASSIFICATION else torch.cat(rows))


def teacher_table(teacher: nn.Module, ds: Dataset, tokenizer: Any, kind: TaskKind, batch_size: int,
                  device: torch.device, cache_dir: str | None, progress: bool = True) -> TeacherTable:
    """The teacher's outputs over `ds`: from `<cache_dir>/teacher/`, else computed (and cached there)."""
    if cache_dir is None:
        return compute(teacher, ds, tokenizer, kind, batch_size, device, progress)
    path = Path(cache_dir).expanduser() / "teacher" / f"{fingerprint(teacher, ds, kind)}.pt"
    if path.is_file():
        try:
            table = TeacherTable(torch.load(path, weights_only=True))
            log.info("teacher outputs from %s", path)
            return table
        except Exception as e:  # a truncated or foreign file: recompute it
            log.warning("ignoring the unreadable teacher cache %s (%s)", path, e)
    table = compute(teacher, ds, tokenizer, kind, batch_size, device, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: torch.save(table.rows, tmp))
    log.info("teacher outputs cached in %s", path)
    return table


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


def kd_mask(batch: dict[str, torch.Tensor], kind: TaskKind) -> torch.Tensor | None:
    """[B, T] 1 where a token counts in token-classification distillation (it has a label), else None."""
    return (batch["labels"] != -100).float() if kind is TaskKind.TOKEN_CLASSIFICATION else None


def split_rows(batch: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """(the model's inputs, the batch's rows in the teacher's table or None): the model never sees `INDEX`."""
    return {k: v for k, v in batch.items() if k != INDEX}, batch.get(INDEX)


def teacher_outputs(teacher: nn.Module | TeacherTable, batch: dict[str, torch.Tensor], rows: torch.Tensor | None,
                    device: torch.device, hidden: bool = False) -> Any:
    """The teacher's outputs for `batch`: looked up by the batch's `rows` in a table, or from the live model."""
    if isinstance(teacher, TeacherTable):
        return teacher.lookup(rows, batch["input_ids"].shape[1], device)
    with torch.no_grad():
        return teacher(**batch, output_hidden_states=hidden)


class DistilledLoss:
    """A search loss (`search.bilevel.LossFn`): (1 - weight) * the task loss + weight * KL(teacher || model) at
    `temperature`. Batches may carry `INDEX` (their rows in the teacher's table); the model never sees it."""

    def __init__(self, teacher: nn.Module | TeacherTable, kind: TaskKind, weight: float, temperature: float) -> None:
        self.teacher, self.kind, self.weight, self.temperature = teacher, kind, weight, temperature

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch, rows = split_rows(batch)
        out = model(**batch)
        t_out = teacher_outputs(self.teacher, batch, rows, batch["input_ids"].device)
        kd = distillation_loss(out, t_out, self.kind, self.temperature, kd_mask(batch, self.kind))
        return (1 - self.weight) * out.loss + self.weight * kd
