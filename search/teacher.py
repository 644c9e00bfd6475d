"""The FP teacher's outputs over the training set, filled in as training meets each example and cached on disk.

QAT distils from the FP model (search/qat.py), which runs in eval mode: its output for a training example
never changes. So instead of one teacher forward pass per example per epoch per QAT run (about a sixth of a
QAT step on a CPU), each example's output is computed once, the first time a training batch holds it, and kept
in a table saved under `cache_dir`, keyed by the teacher's weights and the tokenised examples. Every later run
of a comparison (three methods x budgets x seeds on one checkpoint), in this process or another, reads the rows
that are there and adds the ones it meets first. So a run pays for the teacher only on examples no run has seen:
a QAT of a fifth of an epoch computes a fifth of the table, not a pass over the whole training set before its
first step. The training loader carries each example's row number (`INDEX`), and a step looks its examples'
outputs up. Under several processes (accelerate) each fills its own table and only the main one saves it.

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

from .data import INDEX, MODEL_COLUMNS
from .rundir import write_atomic
from .tasks import TaskKind

log = logging.getLogger(__name__)

# 2: {"rows", "filled"}, a table that fills as runs meet rows. A file of version 1 (every row, no mask) has a key
# of its own, so a process of the older version never reads a version-2 file; this one starts from it.
CACHE_VERSION = 2
_LEGACY_VERSIONS = (1,)
_INPUTS = tuple(c for c in MODEL_COLUMNS if c not in ("labels", "start_positions", "end_positions"))


def cacheable(kind: TaskKind, hidden_weight: float) -> bool:
    """Whether a table can stand in for the live teacher: logits-only distillation outside QA."""
    return kind is not TaskKind.QUESTION_ANSWERING and hidden_weight == 0


@dataclass
class TeacherTable:
    """The teacher's logits per training example: [N, C] (or [N, 1] for regression), or a list of [L_i, C] rows
    for token classification; `filled` [N] marks the rows that hold outputs. With a live `teacher`, a lookup
    first computes the rows of its batch that are missing; `save()` merges the table into its cache file `path`."""

    rows: torch.Tensor | list[torch.Tensor] | None
    filled: torch.Tensor
    kind: TaskKind = TaskKind.CLASSIFICATION
    teacher: nn.Module | None = None
    path: Path | None = None
    computed: int = 0  # rows this table's teacher filled since it was made or last saved

    @classmethod
    def full(cls, rows: torch.Tensor | list[torch.Tensor], kind: TaskKind = TaskKind.CLASSIFICATION) -> "TeacherTable":
        """A table whose every row is given."""
        return cls(rows, torch.ones(len(rows), dtype=torch.bool), kind)

    @classmethod
    def empty(cls, n: int, kind: TaskKind, teacher: nn.Module | None = None,
              path: Path | None = None) -> "TeacherTable":
        """A table of `n` rows, none filled yet, which `teacher` fills as batches need them."""
        token = kind is TaskKind.TOKEN_CLASSIFICATION
        return cls([torch.empty(0)] * n if token else None, torch.zeros(n, dtype=torch.bool), kind, teacher, path)

    def lookup(self, index: torch.Tensor, batch: Mapping[str, torch.Tensor], device: torch.device) -> SimpleNamespace:
        """An output object like the teacher's for the examples `index` ([B]) of `batch` (padded to its length)."""
        index = index.cpu()
        missing = ~self.filled[index]
        if missing.any():
            self._fill(index, missing, batch)
        idx, seq_len = index.tolist(), batch["input_ids"].shape[1]
        if isinstance(self.rows, torch.Tensor):
            logits = self.rows[idx]
        else:
            logits = self.rows[idx[0]].new_zeros(len(idx), seq_len, self.rows[idx[0]].shape[-1])  # [B, T, C]
            for b, i in enumerate(idx):
                row = self.rows[i]
                logits[b, :row.shape[0]] = row
        return SimpleNamespace(logits=logits.to(device))

    @torch.no_grad()
    def _fill(self, index: torch.Tensor, missing: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> None:
        """Run the teacher (eval mode, fp32) on the examples of `batch` whose rows are missing, and keep them."""
        if self.teacher is None:
            raise RuntimeError(f"the teacher table has no outputs for rows {index[missing].tolist()[:8]} "
                               f"and no teacher to compute them")
        pos = missing.nonzero().squeeze(1)
        device = next(self.teacher.parameters()).device
        inputs = {k: v[pos.to(v.device)].to(device) for k, v in batch.items() if k in _INPUTS}
        self.teacher.eval()
        with torch.autocast(device.type, enabled=False):
            logits = self.teacher(**inputs).logits.float().cpu()
        rows = index[pos]
        if self.kind is TaskKind.TOKEN_CLASSIFICATION:
            for b, n in enumerate(inputs["attention_mask"].sum(-1).tolist()):
                self.rows[int(rows[b])] = logits[b, :n].clone()  # [T, C] -> [L_i, C]
        else:
            if self.rows is None:
                self.rows = logits.new_zeros((len(self.filled), *logits.shape[1:]))
            self.rows[rows] = logits
        self.filled[rows] = True
        self.computed += len(rows)

    def merge(self, other: "TeacherTable") -> None:
        """Take `other`'s rows where this table has none (the same examples, from another run)."""
        take = other.filled & ~self.filled
        if not take.any():
            return
        if self.kind is TaskKind.TOKEN_CLASSIFICATION:
            for i in take.nonzero().squeeze(1).tolist():
                self.rows[i] = other.rows[i]
        else:
            if self.rows is None:
                self.rows = torch.zeros_like(other.rows)
            self.rows[take] = other.rows[take]
        self.filled |= take

    def save(self) -> None:
        """Merge the rows computed here with the ones another run saved meanwhile, into `path` (atomically)."""
        if self.path is None or self.computed == 0:
            return
        if self.path.is_file():
            on_disk = read_table(self.path, len(self.filled), self.kind)
            if on_disk is not None:
                self.merge(on_disk)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, lambda tmp: torch.save({"rows": self.rows, "filled": self.filled}, tmp))
        except OSError as e:  # the run's own results matter more than the cache: the next run recomputes these rows
            log.warning("could not cache the teacher's outputs in %s (%s); later runs will compute them again",
                        self.path, e)
            return
        log.info("teacher outputs: %d rows computed in this run, %d of %d cached in %s", self.computed,
                 int(self.filled.sum()), len(self.filled), self.path)
        self.computed = 0


def read_table(path: Path, n: int, kind: TaskKind) -> TeacherTable | None:
    """The table cached in `path` (either version's format), or None, with a warning, if it cannot be used."""
    try:
        saved = torch.load(path, weights_only=True)
        if isinstance(saved, dict):
            rows, filled = saved["rows"], saved["filled"].bool()
        else:  # the first version: every row, no mask
            rows, filled = saved, torch.ones(len(saved), dtype=torch.bool)
        token = kind is TaskKind.TOKEN_CLASSIFICATION
        if len(filled) != n or (rows is not None and (len(rows) != n or isinstance(rows, list) != token)):
            raise ValueError(f"it has {len(filled)} rows for {n} examples")
        return TeacherTable(rows, filled, kind)
    except Exception as e:  # a truncated or foreign file: recompute what it held
        log.warning("ignoring the unreadable teacher cache %s (%s)", path, e)
        return None


def with_index(ds: Dataset) -> Dataset:
    """`ds` with each row's number as a column, so a shuffled batch can find its rows in a table."""
    return ds.add_column(INDEX, list(range(len(ds))))


def fingerprint(teacher: nn.Module, ds: Dataset, kind: TaskKind) -> str:
    """A key over the teacher's weights and the model inputs of `ds` (not its labels)."""
    return fingerprints(teacher, ds, kind, (CACHE_VERSION,))[CACHE_VERSION]


def fingerprints(teacher: nn.Module, ds: Dataset, kind: TaskKind, versions: tuple[int, ...]) -> dict[int, str]:
    """`fingerprint` as each of the cache `versions` computed it, in one pass over the weights and examples."""
    hs = {v: hashlib.sha256(f"v{v}:{kind.value}:{type(teacher).__name__}".encode()) for v in versions}

    def update(data: bytes) -> None:
        for h in hs.values():
            h.update(data)

    for name, t in sorted(teacher.state_dict().items()):
        update(name.encode())
        update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    table = ds.data.table
    indices = getattr(ds, "_indices", None)  # a select()ed or shuffled view of that table: which rows, in order
    if indices is not None:
        update(indices.column(0).to_numpy().tobytes())
    for col in _INPUTS:
        if col in table.column_names:
            arr = table.column(col).combine_chunks()
            update(col.encode())
            update(arr.offsets.to_numpy().tobytes())
            update(arr.values.to_numpy().tobytes())
    return {v: h.hexdigest()[:24] for v, h in hs.items()}


def teacher_table(teacher: nn.Module, ds: Dataset, kind: TaskKind, cache_dir: str | None) -> TeacherTable:
    """A table of `teacher`'s outputs over `ds` that fills itself as batches need rows: starting from the rows
    cached under `<cache_dir>/teacher/` (none without a `cache_dir`); `save()` it after training."""
    teacher.eval()
    if cache_dir is None:
        return TeacherTable.empty(len(ds), kind, teacher)
    folder = Path(cache_dir).expanduser() / "teacher"
    keys = fingerprints(teacher, ds, kind, (CACHE_VERSION, *_LEGACY_VERSIONS))
    path = folder / f"{keys[CACHE_VERSION]}.pt"
    table = TeacherTable.empty(len(ds), kind, teacher, path)
    for source in (folder / f"{key}.pt" for key in keys.values()):  # this version's file first, then older ones'
        cached = read_table(source, len(ds), kind) if source.is_file() else None
        if cached is not None:
            table.merge(cached)
            log.info("teacher outputs from %s (%d of %d rows)", source, int(table.filled.sum()), len(ds))
        if table.filled.all():
            break
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
        return teacher.lookup(rows, batch, device)
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
