"""The teacher's outputs as a table (search/teacher.py): the same logits, the same distillation loss and the
same QAT steps as the live teacher, for shuffled, dynamically padded batches; cached on disk under a key
of the weights and the examples."""
import logging

import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset
from transformers import BertForSequenceClassification, BertForTokenClassification, get_constant_schedule

from conftest import tiny_config
from data_fixtures import tiny_tokenizer
from search import teacher as teacher_mod
from search.data import INDEX, make_loader
from search.qat import qat_optimizer, qat_step
from search.quantized import quantize
from search.tasks import TaskKind
from search.teacher import DistilledLoss, TeacherTable, cacheable, distillation_loss, teacher_table, with_index
from supernet import Architecture, SearchSpace, to_supernet

SPACE = SearchSpace(w_bits=[2, 4, 8], groups=4, a_bits=[8])


def _dataset(n: int, per_token: bool, seed: int = 0) -> Dataset:
    """n examples of 3..12 tokens ([CLS] ... [SEP]); per-token labels (-100 on the specials) or one label."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for i in range(n):
        length = int(torch.randint(3, 13, (1,), generator=g))
        ids = [2] + torch.randint(5, 99, (length - 2,), generator=g).tolist() + [3]
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * length)
        rows["labels"].append([-100] + [j % 3 for j in range(length - 2)] + [-100] if per_token else i % 2)
    return Dataset.from_dict(rows)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("kind", [TaskKind.CLASSIFICATION, TaskKind.REGRESSION, TaskKind.TOKEN_CLASSIFICATION])
def test_table_gives_the_live_teachers_logits_and_loss(tokenizer, kind):
    per_token = kind is TaskKind.TOKEN_CLASSIFICATION
    labels = {TaskKind.REGRESSION: 1, TaskKind.CLASSIFICATION: 2, TaskKind.TOKEN_CLASSIFICATION: 3}[kind]
    cls = BertForTokenClassification if per_token else BertForSequenceClassification
    torch.manual_seed(0)
    teacher = cls(tiny_config(num_labels=labels)).eval()
    ds = _dataset(21, per_token)
    if kind is TaskKind.REGRESSION:
        ds = ds.map(lambda r, i: {"labels": float(i) / 7}, with_indices=True)
    table = teacher_table(teacher, ds, tokenizer, kind, batch_size=8, device=torch.device("cpu"), cache_dir=None,
                          progress=False)
    torch.manual_seed(1)
    student = cls(teacher.config).eval()
    loader = make_loader(with_index(ds), tokenizer, 5, shuffle=True, seed=3)
    lengths = set()
    for batch in loader:
        rows = batch.pop(INDEX)
        with torch.no_grad():
            live, s_out = teacher(**batch), student(**batch)
        t_out = table.lookup(rows, batch["input_ids"].shape[1], torch.device("cpu"))
        mask = (batch["labels"] != -100).float() if per_token else None
        if per_token:  # the table pads with zeros where the live teacher has logits: outside the mask
            keep = batch["attention_mask"].bool()
            torch.testing.assert_close(t_out.logits[keep], live.logits[keep], atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(t_out.logits, live.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(distillation_loss(s_out, t_out, kind, 2.0, mask),
                                   distillation_loss(s_out, live, kind, 2.0, mask), atol=1e-6, rtol=1e-5)
        lengths.add(batch["input_ids"].shape[1])
    assert len(lengths) > 1  # batches were padded to different lengths


def test_qat_steps_with_the_table_equal_those_with_the_live_teacher(tiny_cfg, tokenizer):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_cfg).eval()
    arch = Architecture.from_supernet(to_supernet(BertForSequenceClassification(tiny_cfg), SPACE))
    ds = _dataset(16, per_token=False)
    table = teacher_table(teacher, ds, tokenizer, TaskKind.CLASSIFICATION, 16, torch.device("cpu"), None, False)
    results = []
    for source in (teacher, table):
        torch.manual_seed(1)
        model = quantize(BertForSequenceClassification(tiny_cfg), arch, SPACE)
        model.load_state_dict(teacher.state_dict(), strict=False)
        opt = qat_optimizer(model, 1e-2, 1e-3, 0.01)
        step = qat_step(model, source, opt, get_constant_schedule(opt), Accelerator(cpu=True), TaskKind.CLASSIFICATION,
                        kd_weight=0.5, kd_temperature=2.0, hidden_weight=0.0, dampen_weight=0.0, max_grad_norm=1.0)
        logs = [step(batch, i) for i, batch in enumerate(make_loader(with_index(ds), tokenizer, 4, shuffle=True, seed=0))]
        results.append((logs, [p.detach().clone() for p in model.parameters()]))
    (live_logs, live_params), (table_logs, table_params) = results
    assert len(live_logs) == 4 and live_logs[0]["loss/kd"] > 0
    for a, b in zip(live_logs, table_logs):
        assert a["loss/kd"] == pytest.approx(b["loss/kd"], rel=1e-4) and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    for a, b in zip(live_params, table_params):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_the_distilled_search_loss_mixes_the_labels_loss_and_the_kl_to_the_teacher(tiny_cfg, tokenizer):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_cfg).eval()
    ds = _dataset(12, per_token=False)
    table = teacher_table(teacher, ds, tokenizer, TaskKind.CLASSIFICATION, 16, torch.device("cpu"), None, False)
    torch.manual_seed(1)
    student = BertForSequenceClassification(tiny_cfg).eval()
    batch = next(iter(make_loader(with_index(ds), tokenizer, 6, shuffle=True, seed=0)))
    plain = {k: v for k, v in batch.items() if k != INDEX}  # the model never sees the row numbers
    with torch.no_grad():
        out, live = student(**plain), teacher(**plain)
        kl = distillation_loss(out, live, TaskKind.CLASSIFICATION, 3.0)
        losses = {w: float(DistilledLoss(table, TaskKind.CLASSIFICATION, w, 3.0)(student, batch)) for w in (0, 0.25, 1)}
        on_itself = float(DistilledLoss(table, TaskKind.CLASSIFICATION, 1.0, 3.0)(teacher, batch))
    assert float(kl) > 0 and losses[0] == pytest.approx(float(out.loss), rel=1e-5)
    assert losses[1] == pytest.approx(float(kl), rel=1e-4)
    assert losses[0.25] == pytest.approx(0.75 * float(out.loss) + 0.25 * float(kl), rel=1e-4)
    assert on_itself == pytest.approx(0, abs=1e-6)  # the FP model is its own teacher: nothing to distil


def test_table_is_cached_by_weights_and_examples(tiny_cfg, tokenizer, tmp_path, monkeypatch, caplog):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_cfg).eval()
    ds = _dataset(10, per_token=False)
    weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    args = (tokenizer, TaskKind.CLASSIFICATION, 4, torch.device("cpu"), str(tmp_path), False)
    first = teacher_table(teacher, ds, *args)
    files = list((tmp_path / "teacher").glob("*.pt"))
    assert len(files) == 1

    calls = []
    real = teacher_mod.compute
    monkeypatch.setattr(teacher_mod, "compute", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = teacher_table(teacher, ds, *args)
    assert calls == [] and torch.equal(again.rows, first.rows)  # read back, not recomputed

    other = ds.map(lambda r: {"input_ids": [r["input_ids"][0], 5 + r["input_ids"][1] % 90, *r["input_ids"][2:]]})
    teacher_table(teacher, other, *args)  # other examples of the same lengths
    with torch.no_grad():
        next(teacher.parameters()).add_(1e-3)
    teacher_table(teacher, ds, *args)  # other weights
    assert len(calls) == 2 and len(list((tmp_path / "teacher").glob("*.pt"))) == 3

    files[0].write_bytes(b"not a tensor file")  # a damaged cache entry is recomputed, with a warning
    teacher.load_state_dict(weights)
    with caplog.at_level(logging.WARNING):
        fixed = teacher_table(teacher, ds, *args)
    assert len(calls) == 3 and "unreadable teacher cache" in caplog.text
    torch.testing.assert_close(fixed.rows, first.rows)


def test_a_selection_of_rows_has_a_key_of_its_own(tiny_cfg):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_cfg)
    ds = _dataset(10, per_token=False)
    keys = {teacher_mod.fingerprint(teacher, d, TaskKind.CLASSIFICATION)
            for d in (ds, ds.select([0, 1, 2]), ds.select([2, 1, 0]), ds.select([0, 1, 2]).flatten_indices())}
    assert len(keys) == 3  # the flattened selection is the same rows as the selection


def test_question_answering_and_hidden_states_keep_the_live_teacher():
    assert cacheable(TaskKind.CLASSIFICATION, 0.0) and cacheable(TaskKind.TOKEN_CLASSIFICATION, 0.0)
    assert not cacheable(TaskKind.QUESTION_ANSWERING, 0.0)
    assert not cacheable(TaskKind.CLASSIFICATION, 0.5)


def test_lookup_pads_token_rows_to_the_batch(tokenizer):
    table = TeacherTable([torch.ones(2, 3), 2 * torch.ones(4, 3)])
    out = table.lookup(torch.tensor([1, 0]), 5, torch.device("cpu")).logits
    assert out.shape == (2, 5, 3)
    assert out[0, :4].eq(2).all() and out[0, 4:].eq(0).all() and out[1, :2].eq(1).all() and out[1, 2:].eq(0).all()
