"""Task metrics, NER tag decoding and SQuAD span post-processing.

Every metric is reported as a percentage (0-100), GLUE-leaderboard style: accuracy, F1 of the positive
class (MRPC, QQP), Matthews correlation (CoLA), Pearson and Spearman correlation and their mean
`combined` (STS-B), seqeval entity-level precision / recall / F1 in strict IOB2 mode (CoNLL-2003), and
the SQuAD v1.1 exact match and token F1 of the official evaluation script (max over gold answers).

Which metrics a task reports, and which is the main one, comes from `search.tasks`.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

from search.tasks import TaskKind, TaskSpec, get_task

__all__ = [
    "compute_metrics",
    "main_metric",
    "accuracy",
    "binary_f1",
    "matthews_corr",
    "ner_scores",
    "ids_to_tags",
    "normalize_answer",
    "squad_scores",
    "squad_references",
    "postprocess_qa",
]


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    return float(np.mean(predictions == references) * 100.0)


def binary_f1(predictions: np.ndarray, references: np.ndarray) -> float:
    """F1 of the positive class (label 1); 0 when there is no true or predicted positive."""
    tp = float(np.sum((predictions == 1) & (references == 1)))
    fp = float(np.sum((predictions == 1) & (references != 1)))
    fn = float(np.sum((predictions != 1) & (references == 1)))
    return 0.0 if tp == 0 else 100.0 * 2 * tp / (2 * tp + fp + fn)


def matthews_corr(predictions: np.ndarray, references: np.ndarray) -> float:
    """Binary Matthews correlation; 0 when a row or column of the confusion matrix is empty."""
    tp = float(np.sum((predictions == 1) & (references == 1)))
    tn = float(np.sum((predictions != 1) & (references != 1)))
    fp = float(np.sum((predictions == 1) & (references != 1)))
    fn = float(np.sum((predictions != 1) & (references == 1)))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else 100.0 * (tp * tn - fp * fn) / denom


def _correlations(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    # A constant prediction has no correlation; scipy would warn and return nan.
    if np.ptp(predictions) == 0 or np.ptp(references) == 0:
        pearson = spearman = 0.0
    else:
        pearson = 100.0 * float(stats.pearsonr(predictions, references)[0])
        spearman = 100.0 * float(stats.spearmanr(predictions, references)[0])
    return {"pearson": pearson, "spearman": spearman, "combined": (pearson + spearman) / 2}


def ner_scores(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """seqeval entity-level precision, recall and F1 in strict IOB2 mode.

    Strict mode counts an entity only when its B-/I- tags form a well-formed IOB2 span; on
    well-formed predictions it agrees with conlleval.
    """
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    preds, refs = [list(p) for p in predictions], [list(r) for r in references]
    kwargs = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
    return {
        "f1": 100.0 * float(f1_score(refs, preds, **kwargs)),
        "precision": 100.0 * float(precision_score(refs, preds, **kwargs)),
        "recall": 100.0 * float(recall_score(refs, preds, **kwargs)),
    }


def ids_to_tags(
    predictions: Any, label_ids: Any, label_names: Sequence[str]
) -> tuple[list[list[str]], list[list[str]]]:
    """Per-token predictions (ids, or logits with a trailing class axis) and label ids with -100 at
    ignored positions -> (predicted tag sequences, gold tag sequences), ignored positions dropped.

    Rows may be ragged lists or padded arrays; padding must carry the -100 label.
    """
    pred_tags, gold_tags = [], []
    for pred_row, gold_row in zip(predictions, label_ids, strict=True):
        pred_row, gold_row = np.asarray(pred_row), np.asarray(gold_row)
        if pred_row.ndim == 2:  # (seq, num_labels) logits -> (seq,) ids
            pred_row = pred_row.argmax(-1)
        keep = gold_row != -100
        pred_tags.append([label_names[int(i)] for i in pred_row[: len(gold_row)][keep]])
        gold_tags.append([label_names[int(i)] for i in gold_row[keep]])
    return pred_tags, gold_tags


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower-case, drop punctuation and a/an/the, squeeze spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def _token_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """SQuAD v1.1 exact match and F1 (percent), max over gold answers, averaged over `references`.

    A question without a prediction scores 0, as in the official script.
    """
    if not references:
        raise ValueError("squad_scores needs at least one reference question")
    em = f1 = 0.0
    for qid, golds in references.items():
        pred = predictions.get(qid)
        if pred is None or not golds:
            continue
        em += max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)
        f1 += max(_token_f1(pred, g) for g in golds)
    n = len(references)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


def squad_references(examples: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Gold answer texts by question id, from rows with `id` and `answers` (normalised SQuAD rows)."""
    return {str(ex["id"]): list(ex["answers"]["text"]) for ex in examples}


def _sentence_metrics(spec: TaskSpec, predictions: Any, references: Any) -> dict[str, float]:
    preds, refs = np.asarray(predictions), np.asarray(references)
    if spec.kind is TaskKind.REGRESSION:
        preds = preds.reshape(len(preds), -1)[:, 0] if preds.ndim > 1 else preds
        return _correlations(preds.astype(np.float64), refs.astype(np.float64))
    if preds.ndim == 2:  # (n, num_labels) logits -> (n,) class ids
        preds = preds.argmax(-1)
    if preds.shape != refs.shape:
        raise ValueError(f"predictions {preds.shape} and references {refs.shape} differ in shape")
    metrics = {"accuracy": accuracy(preds, refs)}
    if "f1" in spec.metrics:
        metrics["f1"] = binary_f1(preds, refs)
    if "matthews_corr" in spec.metrics:
        metrics = {"matthews_corr": matthews_corr(preds, refs), **metrics}
    return metrics


_BY_KIND: dict[TaskKind, Callable[[TaskSpec, Any, Any], dict[str, float]]] = {
    TaskKind.CLASSIFICATION: _sentence_metrics,
    TaskKind.REGRESSION: _sentence_metrics,
    TaskKind.TOKEN_CLASSIFICATION: lambda spec, p, r: ner_scores(p, r),
    TaskKind.QUESTION_ANSWERING: lambda spec, p, r: squad_scores(p, r),
}


def compute_metrics(
    task: str, predictions: Any, references: Any, split: str | None = None
) -> dict[str, float]:
    """The metrics of `task`, in percent, named with the split's suffix (MNLI: `_m` / `_mm`).

    predictions / references by task kind:
    - classification: class ids or (n, num_labels) logits / class ids
    - regression (STS-B): scores, shape (n,) or (n, 1) / gold scores
    - NER: lists of IOB2 tag sequences (see `ids_to_tags`) / the same
    - SQuAD: {question id: answer text} (see `postprocess_qa`) / {question id: [gold texts]}
    """
    spec = get_task(task)
    if len(references) == 0:
        raise ValueError(f"no references to score for task {task!r}")
    metrics = _BY_KIND[spec.kind](spec, predictions, references)
    suffix = spec.metric_suffix(split)
    return {name + suffix: value for name, value in metrics.items()}


def main_metric(task: str, metrics: Mapping[str, float]) -> float:
    """The task's main metric out of `metrics` (KeyError naming what is there when absent)."""
    name = get_task(task).main_metric
    if name not in metrics:
        raise KeyError(f"main metric {name!r} of task {task!r} not in {sorted(metrics)}")
    return metrics[name]


def postprocess_qa(
    examples: Any,
    features: Any,
    start_logits: Any,
    end_logits: Any,
    n_best: int = 20,
    max_answer_len: int = 30,
) -> dict[str, str]:
    """Best answer text per question id from window-level start/end logits (HF-style).

    `features` are the tokenised eval windows (`example_id`, `offset_mapping` with None outside the
    context), aligned row by row with the logits; a question's candidates are pooled over its windows
    and scored by start logit + end logit. Questions with no valid span get "".
    """
    windows: dict[str, list[int]] = collections.defaultdict(list)
    for i, example_id in enumerate(list(features["example_id"])):
        windows[example_id].append(i)
    # list(): a Dataset column is read lazily; materialise it once instead of once per window.
    offsets_all = list(features["offset_mapping"])
    answers = {}
    for example in examples:
        context, best_score, best_text = example["context"], -np.inf, ""
        for i in windows.get(example["id"], []):
            offsets = offsets_all[i]
            n = len(offsets)
            # Rows may be padded wider than the window (batched logits) or ragged lists.
            start_row = np.asarray(start_logits[i], dtype=np.float64)[:n]
            end_row = np.asarray(end_logits[i], dtype=np.float64)[:n]
            starts = np.argsort(start_row)[::-1][:n_best]
            ends = np.argsort(end_row)[::-1][:n_best]
            for s in starts:
                for e in ends:
                    if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_len:
                        continue
                    score = start_row[s] + end_row[e]
                    if score > best_score:
                        best_score, best_text = score, context[offsets[s][0]: offsets[e][1]]
        answers[example["id"]] = best_text
    return answers
