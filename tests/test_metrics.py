"""search/metrics.py against hand-computed values (all metrics in percent)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from search.metrics import (
    compute_metrics, ids_to_tags, main_metric, normalize_answer, postprocess_qa, squad_references,
    squad_scores,
)
from search.tasks import CONLL_LABELS, TASKS

# Confusion matrix by hand: tp=3 (rows 0, 1, 7), fp=1 (row 2), fn=1 (row 5), tn=3 (rows 3, 4, 6).
PREDS = [1, 1, 1, 0, 0, 0, 0, 1]
REFS = [1, 1, 0, 0, 0, 1, 0, 1]


def test_mcc_f1_accuracy_from_confusion_matrix():
    # MCC = (3*3 - 1*1) / sqrt(4*4*4*4) = 0.5; F1 = 2*3 / (2*3 + 1 + 1) = 0.75; accuracy 6/8.
    assert compute_metrics("cola", PREDS, REFS)["matthews_corr"] == pytest.approx(50.0)
    mrpc = compute_metrics("mrpc", PREDS, REFS)
    assert mrpc == pytest.approx({"f1": 75.0, "accuracy": 75.0})
    assert compute_metrics("sst2", PREDS, REFS) == pytest.approx({"accuracy": 75.0})


def test_classification_accepts_logits():
    logits = np.array([[0.1, 2.0], [3.0, -1.0], [0.0, 0.5]])
    assert compute_metrics("rte", logits, [1, 0, 0])["accuracy"] == pytest.approx(200 / 3)


def test_degenerate_cases_are_zero_not_nan():
    assert compute_metrics("cola", [1, 1, 1], [1, 0, 1])["matthews_corr"] == 0.0
    assert compute_metrics("qqp", [0, 0], [0, 0])["f1"] == 0.0
    assert compute_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])["pearson"] == 0.0


def test_pearson_spearman_on_three_points():
    # x = (1, 2, 3), y = (1, 2, 4): cov = 3, |dx| = sqrt(2), |dy| = sqrt(42)/3 -> r = 9/sqrt(84).
    out = compute_metrics("stsb", np.array([[1.0], [2.0], [3.0]]), [1.0, 2.0, 4.0])
    assert out["pearson"] == pytest.approx(100 * 9 / math.sqrt(84))
    assert out["spearman"] == pytest.approx(100.0)
    assert out["combined"] == pytest.approx((out["pearson"] + out["spearman"]) / 2)


def test_mnli_split_suffix_and_main_metric():
    m = compute_metrics("mnli", [0, 1, 2, 2], [0, 1, 2, 0], split="validation_matched")
    mm = compute_metrics("mnli", [0, 1], [1, 1], split="validation_mismatched")
    assert m == pytest.approx({"accuracy_m": 75.0}) and mm == pytest.approx({"accuracy_mm": 50.0})
    assert main_metric("mnli", {**m, **mm}) == pytest.approx(75.0)
    with pytest.raises(KeyError, match="accuracy_m"):
        main_metric("mnli", mm)


def test_every_task_reports_its_main_metric():
    for name, spec in TASKS.items():
        if name in ("conll03", "squad"):
            continue
        split = spec.dev_splits[0]
        preds = [0.5, 1.5, 2.5] if name == "stsb" else [0, 1, 1]
        out = compute_metrics(name, preds, [0.0, 2.0, 2.0] if name == "stsb" else [0, 1, 0], split)
        assert spec.main_metric in out, name


def test_entity_f1_with_one_partial_match():
    # Gold entities: PER(0-1), LOC(3). Predicted: PER(0-0) (partial, wrong), LOC(3). P = R = F1 = 1/2.
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "O", "O", "B-LOC"]]
    assert compute_metrics("conll03", pred, gold) == pytest.approx(
        {"f1": 50.0, "precision": 50.0, "recall": 50.0})
    # Two sentences: 3 gold, 2 predicted, 2 correct -> P = 100, R = 200/3, F1 = 80.
    gold2 = gold + [["B-ORG", "O"]]
    pred2 = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "O"]]
    assert compute_metrics("conll03", pred2, gold2) == pytest.approx(
        {"f1": 80.0, "precision": 100.0, "recall": 200 / 3})


def test_ids_to_tags_drops_ignored_positions():
    labels = np.array([[-100, 1, -100, 2, -100], [-100, 0, -100, -100, -100]])
    logits = np.zeros((2, 5, len(CONLL_LABELS)))
    logits[0, 1, 1] = logits[0, 3, 0] = logits[1, 1, 5] = 1.0
    pred, gold = ids_to_tags(logits, labels, CONLL_LABELS)
    assert gold == [["B-PER", "I-PER"], ["O"]]
    assert pred == [["B-PER", "O"], ["B-LOC"]]
    pred_ids, _ = ids_to_tags([[0, 1, 0, 2], [0, 0]], [[-100, 1, -100, 2], [-100, 0]], CONLL_LABELS)
    assert pred_ids == [["B-PER", "I-PER"], ["O"]]


@pytest.mark.parametrize("text, norm", [
    ("The  Cat!", "cat"),
    ("an apple, a pear", "apple pear"),
    ("  Théâtre   the  ", "théâtre"),
    ("theatre", "theatre"),
])
def test_squad_normalisation(text, norm):
    assert normalize_answer(text) == norm


def test_squad_em_f1_max_over_gold():
    refs = {"a": ["A cat", "dog"], "b": ["the cat"], "c": ["Paris"]}
    preds = {"a": "the cat", "b": "black cat sat", "c": "London"}
    # a: EM 1, F1 1; b: EM 0, F1 = 2 * (1/3 * 1) / (1/3 + 1) = 0.5; c: 0 and 0.
    assert squad_scores(preds, refs) == pytest.approx({"exact_match": 100 / 3, "f1": 150 / 3})
    assert compute_metrics("squad", preds, refs) == pytest.approx(squad_scores(preds, refs))
    # A missing prediction counts as wrong.
    assert squad_scores({}, refs) == {"exact_match": 0.0, "f1": 0.0}


def test_squad_references_from_rows():
    rows = [{"id": "q1", "answers": {"text": ["x", "y"], "answer_start": [0, 3]}}]
    assert squad_references(rows) == {"q1": ["x", "y"]}


def test_postprocess_qa_hand_windows():
    context = "alpha beta gamma delta"
    examples = [{"id": "q", "context": context}, {"id": "none", "context": "x"}]
    # Three windows of one question; offsets None outside the context (CLS, question, SEP).
    features = {
        "example_id": ["q", "q", "q", "none"],
        "offset_mapping": [
            [None, [0, 5], [6, 10], [11, 16], None],
            [None, [11, 16], [17, 22], None],
            [None, [0, 5], [6, 10], None],
            [None, None],
        ],
    }
    start, end = np.full((4, 5), -10.0), np.full((4, 5), -10.0)
    start[0, 0] = end[0, 0] = 50.0  # CLS: no offset, never chosen
    start[0, 2], end[0, 3] = 3.0, 3.0  # "beta gamma" scores 6
    start[1, 1], end[1, 2] = 4.0, 5.0  # "gamma delta" scores 9: the best valid span
    start[2], end[2] = -100.0, -100.0
    start[2, 2], end[2, 1] = 30.0, 30.0  # "beta" .. "alpha": end before start, invalid
    preds = postprocess_qa(examples, features, start, end, n_best=5)
    assert preds == {"q": "gamma delta", "none": ""}
    # A one-token cap leaves single tokens: "delta" (-10 + 5) beats "gamma" (4 - 10).
    assert postprocess_qa(examples, features, start, end, n_best=5, max_answer_len=1)["q"] == "delta"


def test_unknown_task_raises_value_error():
    with pytest.raises(ValueError, match="valid tasks"):
        compute_metrics("nope", [1], [1])
