"""The task registry: what every supported task is, where its data lives and how it is scored.

A `TaskSpec` is pure data. It names the task kind, the label set, the metrics (and which one is the
main one), the hub dataset, and the on-disk layout of the original files (the GLUE TSVs as the GLUE
download script writes them, the CoNLL-2003 column files, the SQuAD v1.1 JSON). `search/data.py` reads
the data with it and `search/metrics.py` scores predictions with it; neither compares task names.

Label ids follow the hub datasets (`nyu-mll/glue`, `eriktks/conll2003`), so a model fine-tuned on hub
data and one fine-tuned on local files agree on what each logit means.

Split names follow the hub: `train`, `validation` (GLUE `dev.tsv`, CoNLL `eng.testa`, SQuAD dev),
`validation_matched` / `validation_mismatched` for MNLI, `test` for CoNLL `eng.testb`. Any other split
name is looked up in a GLUE folder as `<name with - for _>.tsv`, so `test_labeled` reads
`test-labeled.tsv`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "TaskKind",
    "TsvLayout",
    "TaskSpec",
    "TASKS",
    "CONLL_LABELS",
    "get_task",
]


class TaskKind(enum.Enum):
    """How a task is modelled; decides the tokenisation, the collator and the head."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    TOKEN_CLASSIFICATION = "token_classification"
    QUESTION_ANSWERING = "question_answering"


@dataclass(frozen=True)
class TsvLayout:
    """Where the fields sit in a GLUE TSV file.

    `column_names` is set only for files without a header row (CoLA); the other files are read by
    their header. `text_b` is None for single-sentence tasks. `label_range` bounds regression targets.
    """

    text_a: str
    text_b: str | None
    label: str
    column_names: tuple[str, ...] | None = None
    label_range: tuple[float, float] | None = None


@dataclass(frozen=True)
class TaskSpec:
    """Everything the data and metric code needs to know about one task.

    `files` maps a split name to its file name inside the task folder; `metric_suffixes` renames the
    metrics of a split (MNLI reports `accuracy_m` on matched and `accuracy_mm` on mismatched dev).
    """

    name: str
    kind: TaskKind
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    hub_id: str
    hub_config: str | None
    hub_fields: tuple[str, ...]
    local_dir: str
    files: tuple[tuple[str, str], ...]
    dev_splits: tuple[str, ...] = ("validation",)
    local_parent: str = ""
    tsv: TsvLayout | None = None
    metric_suffixes: tuple[tuple[str, str], ...] = field(default=())

    @property
    def num_labels(self) -> int:
        """Width of the model head: 1 for regression, start/end (2) for extractive QA."""
        if self.kind is TaskKind.REGRESSION:
            return 1
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        """Whether a sentence-level task has a second text."""
        return self.tsv is not None and self.tsv.text_b is not None

    @property
    def label_to_id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names)}

    def file_for(self, split: str) -> str:
        """File name of `split` inside the task folder (GLUE falls back to `<split>.tsv`)."""
        known = dict(self.files)
        if split in known:
            return known[split]
        if self.tsv is not None:
            return split.replace("_", "-") + ".tsv"
        raise ValueError(
            f"task {self.name!r} has no split {split!r}; known splits: {', '.join(known)}"
        )

    def metric_suffix(self, split: str | None) -> str:
        """Suffix appended to every metric name of `split` ('' for most tasks and splits)."""
        return dict(self.metric_suffixes).get(split or "", "")


def _glue(
    name: str,
    kind: TaskKind,
    label_names: tuple[str, ...],
    metrics: tuple[str, ...],
    main_metric: str,
    hub_fields: tuple[str, ...],
    local_dir: str,
    tsv: TsvLayout,
    files: tuple[tuple[str, str], ...] = (("train", "train.tsv"), ("validation", "dev.tsv")),
    dev_splits: tuple[str, ...] = ("validation",),
    metric_suffixes: tuple[tuple[str, str], ...] = (),
) -> TaskSpec:
    return TaskSpec(
        name=name,
        kind=kind,
        label_names=label_names,
        metrics=metrics,
        main_metric=main_metric,
        hub_id="nyu-mll/glue",
        hub_config=name,
        hub_fields=hub_fields,
        local_dir=local_dir,
        local_parent="glue",
        files=files,
        dev_splits=dev_splits,
        tsv=tsv,
        metric_suffixes=metric_suffixes,
    )


_C = TaskKind.CLASSIFICATION
_NLI2 = ("entailment", "not_entailment")

# IOB2 tags in the order of the hub dataset's ClassLabel.
CONLL_LABELS: tuple[str, ...] = (
    "O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC",
)

TASKS: dict[str, TaskSpec] = {
    "cola": _glue(
        "cola", _C, ("unacceptable", "acceptable"), ("matthews_corr",), "matthews_corr",
        ("sentence",), "CoLA",
        TsvLayout("sentence", None, "label",
                  column_names=("source", "label", "original_mark", "sentence")),
    ),
    "sst2": _glue(
        "sst2", _C, ("negative", "positive"), ("accuracy",), "accuracy",
        ("sentence",), "SST-2", TsvLayout("sentence", None, "label"),
    ),
    "mrpc": _glue(
        "mrpc", _C, ("not_equivalent", "equivalent"), ("f1", "accuracy"), "f1",
        ("sentence1", "sentence2"), "MRPC", TsvLayout("#1 String", "#2 String", "Quality"),
    ),
    "stsb": _glue(
        "stsb", TaskKind.REGRESSION, (), ("pearson", "spearman", "combined"), "pearson",
        ("sentence1", "sentence2"), "STS-B",
        TsvLayout("sentence1", "sentence2", "score", label_range=(0.0, 5.0)),
    ),
    "qqp": _glue(
        "qqp", _C, ("not_duplicate", "duplicate"), ("f1", "accuracy"), "f1",
        ("question1", "question2"), "QQP", TsvLayout("question1", "question2", "is_duplicate"),
    ),
    "mnli": _glue(
        "mnli", _C, ("entailment", "neutral", "contradiction"), ("accuracy_m", "accuracy_mm"),
        "accuracy_m", ("premise", "hypothesis"), "MNLI",
        TsvLayout("sentence1", "sentence2", "gold_label"),
        files=(
            ("train", "train.tsv"),
            ("validation_matched", "dev_matched.tsv"),
            ("validation_mismatched", "dev_mismatched.tsv"),
        ),
        dev_splits=("validation_matched", "validation_mismatched"),
        metric_suffixes=(("validation_matched", "_m"), ("validation_mismatched", "_mm")),
    ),
    "qnli": _glue(
        "qnli", _C, _NLI2, ("accuracy",), "accuracy",
        ("question", "sentence"), "QNLI", TsvLayout("question", "sentence", "label"),
    ),
    "rte": _glue(
        "rte", _C, _NLI2, ("accuracy",), "accuracy",
        ("sentence1", "sentence2"), "RTE", TsvLayout("sentence1", "sentence2", "label"),
    ),
    # WNLI's label ids are reversed with respect to RTE/QNLI (1 = entailment), as on the hub.
    "wnli": _glue(
        "wnli", _C, ("not_entailment", "entailment"), ("accuracy",), "accuracy",
        ("sentence1", "sentence2"), "WNLI", TsvLayout("sentence1", "sentence2", "label"),
    ),
    "conll03": TaskSpec(
        name="conll03",
        kind=TaskKind.TOKEN_CLASSIFICATION,
        label_names=CONLL_LABELS,
        metrics=("f1", "precision", "recall"),
        main_metric="f1",
        hub_id="eriktks/conll2003",
        hub_config=None,
        hub_fields=("tokens", "ner_tags"),
        local_dir="conll2003",
        files=(("train", "eng.train"), ("validation", "eng.testa"), ("test", "eng.testb")),
    ),
    "squad": TaskSpec(
        name="squad",
        kind=TaskKind.QUESTION_ANSWERING,
        label_names=("start", "end"),
        metrics=("exact_match", "f1"),
        main_metric="f1",
        hub_id="rajpurkar/squad",
        hub_config=None,
        hub_fields=("id", "question", "context", "answers"),
        local_dir="squad",
        files=(("train", "train-v1.1.json"), ("validation", "dev-v1.1.json")),
    ),
}


def get_task(name: str) -> TaskSpec:
    """The spec of task `name`; a ValueError listing the valid names otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}"
        ) from None
