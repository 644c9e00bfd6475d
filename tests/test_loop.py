"""search/loop.py and search/evaluate.py on a tiny random BERT and synthetic batches: step counting over
epochs, callbacks, resume after an interruption equal to an uninterrupted run, evaluate() against a
hand computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import BertForSequenceClassification, BertForTokenClassification

from conftest import tiny_config
from search.config import MixedPrecision
from search.evaluate import evaluate, main_metric_name, warn_one_class
from search.metrics import ner_scores
from search.tasks import get_task
from search.loop import (
    adamw, linear_warmup, make_accelerator, supervised_step, total_steps, train,
)

N, SEQ, BATCH = 16, 8, 4  # 4 steps per epoch


def _rows(n: int = N, seed: int = 0, token_labels: bool = False) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 99, (n, SEQ), generator=g)
    labels = torch.randint(0, 2, (n, SEQ) if token_labels else (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def _setup(seed: int = 0, init_seed: int = 0):
    """A fresh accelerator, model, optimizer, scheduler and shuffled loader, as a new process has them."""
    accelerator = make_accelerator(MixedPrecision.fp32, seed)
    torch.manual_seed(init_seed)
    model = BertForSequenceClassification(tiny_config(num_labels=2))
    optimizer = adamw(model, lr=1e-3, weight_decay=0.01)
    loader = DataLoader(_rows(), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = linear_warmup(optimizer.optimizer, 6, warmup_ratio=0.2)
    accelerator.register_for_checkpointing(scheduler)
    return accelerator, model, optimizer, scheduler, loader


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Interrupted(Exception):
    pass


def test_total_steps():
    assert total_steps(10, 3.0, None) == 30
    assert total_steps(10, 0.25, None) == 3
    assert total_steps(10, 3.0, 7) == 7
    assert total_steps(3, 0.01, None) == 1


def test_max_steps_spans_epochs_and_callbacks():
    accelerator, model, optimizer, scheduler, loader = _setup()
    logged, evals, seen = [], [], []
    step_fn = supervised_step(model, optimizer, scheduler, accelerator)

    def recording_step(batch, step):
        seen.append(step)
        return step_fn(batch, step)

    result = train(recording_step, loader, accelerator, 6, log_fn=lambda m, s: logged.append((s, dict(m))),
                   eval_fn=lambda: evals.append(1) or {"dev/accuracy": 50.0}, eval_every=2, progress=False)
    assert seen == list(range(6)) and result.steps == 6 and result.start_step == 0
    assert result.epochs == pytest.approx(1.5) and result.examples == 6 * BATCH
    train_logs = [(s, m) for s, m in logged if "loss" in m]
    assert [s for s, _ in train_logs] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(m["loss"]) and "lr" in m and "grad_norm" in m for _, m in train_logs)
    assert train_logs[-1][1]["epoch"] == pytest.approx(1.5)
    # periodic evaluation at 2 and 4; the final model is evaluated by the stage itself
    assert len(evals) == 2 and [s for s, m in logged if "dev/accuracy" in m] == [2, 4]
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0)


def test_resume_equals_uninterrupted_run(tmp_path):
    # uninterrupted: 6 steps (1.5 epochs)
    accelerator, model, optimizer, scheduler, loader = _setup()
    train(supervised_step(model, optimizer, scheduler, accelerator), loader, accelerator, 6,
          state_dir=tmp_path / "full", checkpoint_every=3, progress=False)
    expected = _weights(model)

    # interrupted in step 5 (index 4): the last train state is the one of step 3
    accelerator, model, optimizer, scheduler, loader = _setup()
    step_fn = supervised_step(model, optimizer, scheduler, accelerator)

    def failing(batch, step):
        if step == 4:
            raise Interrupted
        return step_fn(batch, step)

    with pytest.raises(Interrupted):
        train(failing, loader, accelerator, 6, state_dir=tmp_path / "run", checkpoint_every=3, progress=False)
    state = tmp_path / "run"
    assert json.loads((state / "loop.json").read_text()) == {"step": 3}
    assert not (tmp_path / "run.tmp").exists()

    # a new process (same config, another random init) resumes mid-epoch at step 3 and finishes at 6
    accelerator, model, optimizer, scheduler, loader = _setup(init_seed=1)
    seen = []
    step_fn = supervised_step(model, optimizer, scheduler, accelerator)
    result = train(lambda b, s: seen.append(s) or step_fn(b, s), loader, accelerator, 6,
                   state_dir=state, checkpoint_every=3, resume=True, progress=False)
    assert seen == [3, 4, 5] and result.start_step == 3 and result.steps == 6
    assert json.loads((state / "loop.json").read_text()) == {"step": 6}
    got = _weights(model)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_without_state_starts_from_zero(tmp_path):
    accelerator, model, optimizer, scheduler, loader = _setup()
    result = train(supervised_step(model, optimizer, scheduler, accelerator), loader, accelerator, 2,
                   state_dir=tmp_path / "state", resume=True, progress=False)
    assert result.start_step == 0 and result.steps == 2
    assert json.loads((tmp_path / "state" / "loop.json").read_text()) == {"step": 2}


def _reference_accuracy(model, rows) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.stack([r["input_ids"] for r in rows])).logits
    labels = torch.stack([r["labels"] for r in rows])
    return float((logits.argmax(-1) == labels).float().mean() * 100)


def test_evaluate_classification_matches_hand_computation():
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(num_labels=2)).eval()
    rows = _rows(12, seed=3)
    loader = DataLoader(rows, batch_size=5)
    metrics = evaluate(model, loader, "sst2")
    assert metrics == {"accuracy": pytest.approx(_reference_accuracy(model, rows))}
    # the same through an accelerator (gather_for_metrics path)
    accelerator = make_accelerator(MixedPrecision.fp32, 0)
    assert evaluate(model, accelerator.prepare(loader), "sst2", accelerator=accelerator) == metrics
    assert main_metric_name("mnli", {"accuracy_mm": 1.0}) == "accuracy_mm"


def test_one_class_classifier_is_reported(caplog):
    labels = np.array([1] * 68 + [0] * 32)  # MRPC-like: 68% positive
    with caplog.at_level("WARNING", logger="search.evaluate"):
        assert warn_one_class(np.ones(100, dtype=int), labels, "mrpc", "validation")
    assert "100.0% of the predictions are class 1, which 68.0% of the labels are" in caplog.text
    assert warn_one_class(np.array([1] * 98 + [0] * 2), labels, "mrpc", None)  # nearly constant
    assert not warn_one_class(np.array([1] * 90 + [0] * 10), labels, "mrpc", None)  # skewed, not constant
    assert not warn_one_class(np.ones(100, dtype=int), np.ones(100, dtype=int), "sst2", None)  # so are the labels

    # evaluate() checks classification predictions: a model whose head always says class 1
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(num_labels=2)).eval()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 1.0]))
    caplog.clear()
    rows = _rows(12, seed=3)
    with caplog.at_level("WARNING", logger="search.evaluate"):
        evaluate(model, DataLoader(rows, batch_size=5), "sst2", split="validation")
    assert "always predicts one class" in caplog.text


def test_evaluate_ner_ignores_padding_labels():
    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_config(num_labels=9)).eval()
    rows = _rows(6, token_labels=True)
    names = get_task("conll03").label_names
    ignored = torch.zeros(len(rows[0]["labels"]), dtype=torch.bool)
    ignored[0] = ignored[-2:] = True  # [CLS] and a padded tail carry no tag
    with torch.no_grad():
        for r in rows:  # gold = the model's own tags where labelled: F1 100 exactly when the rest is dropped
            r["labels"] = model(input_ids=r["input_ids"][None], attention_mask=r["attention_mask"][None]).logits[0].argmax(-1)
    every = [[names[i] for i in r["labels"].tolist()] for r in rows]  # the model's tags at every position
    as_o = [[t if not ignore else "O" for t, ignore in zip(tags, ignored.tolist())] for tags in every]
    assert ner_scores(every, as_o)["precision"] < 100  # scored as O, the ignored positions' entities would count
    for r in rows:
        r["labels"] = r["labels"].masked_fill(ignored, -100)
    metrics = evaluate(model, DataLoader(rows, batch_size=4), "conll03")
    assert metrics == {"f1": 100.0, "precision": 100.0, "recall": 100.0}


def test_progress_bars_show_only_on_the_main_process_of_a_terminal(monkeypatch):
    import io
    import sys

    from search.progress import progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, progress, main, shown in ((Terminal(), True, True, True), (io.StringIO(), True, True, False),
                                          (Terminal(), False, True, False), (Terminal(), True, False, False)):
        monkeypatch.setattr(sys, "stderr", stream)
        assert list(progress_bar(range(3), desc="work", progress=progress, main=main)) == [0, 1, 2]
        assert ("work: 100%" in stream.getvalue()) == shown


def test_evaluation_shows_a_bar_and_the_run_setting_turns_every_bar_off(monkeypatch):
    # evaluating a large split takes minutes; progress_bar=false also silences datasets' and transformers' bars
    import io
    import sys

    import datasets
    from transformers.utils import logging as hf_logging

    from search import progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    accelerator, model, *_ = _setup()
    rows = [{"input_ids": torch.tensor([1, 2, 3]), "attention_mask": torch.ones(3, dtype=torch.long), "labels": 1}] * 8
    try:
        for setting, shown in ((True, True), (False, False)):
            progress.configure(setting)
            assert datasets.is_progress_bar_enabled() is False and hf_logging.is_progress_bar_enabled() is False  # no tty
            stream = Terminal()
            monkeypatch.setattr(sys, "stderr", stream)
            progress.configure(setting)
            assert datasets.is_progress_bar_enabled() is setting and hf_logging.is_progress_bar_enabled() is setting
            evaluate(model, DataLoader(rows, batch_size=4), "sst2", split="validation")
            assert ("eval validation: " in stream.getvalue()) == shown
    finally:
        progress.configure(True)
