"""The teacher's outputs as a table (search/teacher.py): the same logits, the same distillation loss and the
same QAT steps as the live teacher, for shuffled, dynamically padded batches; each row computed once, when a
batch first needs it, and cached on disk under a key of the weights and the examples, merged across runs."""
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


def _count_rows(teacher) -> list[int]:
    """The batch size of every forward pass of `teacher`, from now on."""
    sizes: list[int] = []
    teacher.register_forward_hook(lambda m, args, kwargs, out: sizes.append(kwargs["input_ids"].shape[0]),
                                  with_kwargs=True)
    return sizes


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
    table = teacher_table(teacher, ds, kind, cache_dir=None)
    torch.manual_seed(1)
    student = cls(teacher.config).eval()
    lengths, computed = set(), []
    for epoch in range(2):  # the first pass fills the table, the second reads it
        rows_computed = 0
        for batch in make_loader(with_index(ds), tokenizer, 5, shuffle=True, seed=3 + epoch):
            rows = batch.pop(INDEX)
            with torch.no_grad():
                live, s_out = teacher(**batch), student(**batch)
            before = table.computed
            t_out = table.lookup(rows, batch, torch.device("cpu"))
            rows_computed += table.computed - before
            mask = (batch["labels"] != -100).float() if per_token else None
            if per_token:  # the table pads with zeros where the live teacher has logits: outside the mask
                keep = batch["attention_mask"].bool()
                torch.testing.assert_close(t_out.logits[keep], live.logits[keep], atol=1e-5, rtol=1e-5)
            else:
                torch.testing.assert_close(t_out.logits, live.logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(distillation_loss(s_out, t_out, kind, 2.0, mask),
                                       distillation_loss(s_out, live, kind, 2.0, mask), atol=1e-6, rtol=1e-5)
            lengths.add(batch["input_ids"].shape[1])
        computed.append(rows_computed)
    assert len(lengths) > 1  # batches were padded to different lengths
    assert computed == [21, 0] and table.filled.all()  # every row once, in the first epoch


def test_qat_steps_with_the_table_equal_those_with_the_live_teacher(tiny_cfg, tokenizer):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_cfg).eval()
    arch = Architecture.from_supernet(to_supernet(BertForSequenceClassification(tiny_cfg), SPACE))
    ds = _dataset(16, per_token=False)
    table = teacher_table(teacher, ds, TaskKind.CLASSIFICATION, None)
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
    table = teacher_table(teacher, ds, TaskKind.CLASSIFICATION, None)
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


def _batch(ds: Dataset, rows: list[int], tokenizer) -> dict[str, torch.Tensor]:
    """The examples `rows` of `ds` as one padded batch with their `INDEX`."""
    [batch] = make_loader(with_index(ds).select(rows), tokenizer, len(rows), shuffle=False, seed=0)
    return batch


def test_each_row_is_computed_once_and_the_cache_merges_the_rows_of_every_run(tiny_cfg, tokenizer, tmp_path, caplog):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_cfg).eval()
    kind, cpu, cache = TaskKind.CLASSIFICATION, torch.device("cpu"), str(tmp_path)
    ds = _dataset(10, per_token=False)
    sizes = _count_rows(teacher)

    def look(table, rows):
        batch = _batch(ds, rows, tokenizer)
        return table.lookup(batch.pop(INDEX), batch, cpu).logits

    first, second = teacher_table(teacher, ds, kind, cache), teacher_table(teacher, ds, kind, cache)
    second.save()  # nothing computed: nothing written
    assert not (tmp_path / "teacher").exists()
    a = look(first, [0, 1, 2, 3])
    assert sizes == [4] and first.filled.tolist() == [True] * 4 + [False] * 6
    mixed = look(first, [2, 4, 3, 5, 6])  # only the rows it lacks reach the teacher
    assert sizes == [4, 3] and torch.equal(mixed[[0, 2]], a[[2, 3]])
    look(second, [8, 9])  # another run over the same examples, at the same time
    first.save()
    second.save()  # merges what the first run saved meanwhile
    [path] = (tmp_path / "teacher").glob("*.pt")

    sizes.clear()
    with caplog.at_level(logging.INFO, logger="search.teacher"):
        third = teacher_table(teacher, ds, kind, cache)
    assert f"teacher outputs from {path} (9 of 10 rows)" in caplog.text
    again = look(third, [3, 0, 2, 1])
    assert sizes == [] and torch.equal(again, a[[3, 0, 2, 1]])  # read back, not recomputed
    look(third, [7, 8])
    assert sizes == [1]

    other = ds.map(lambda r: {"input_ids": [r["input_ids"][0], 5 + r["input_ids"][1] % 90, *r["input_ids"][2:]]})
    keys = {teacher_mod.fingerprint(teacher, d, kind) for d in (ds, other)}  # other examples of the same lengths
    with torch.no_grad():
        next(teacher.parameters()).add_(1e-3)
    keys.add(teacher_mod.fingerprint(teacher, ds, kind))  # other weights
    assert len(keys) == 3 and path.stem in keys


def test_a_damaged_or_foreign_cache_file_is_recomputed_and_a_whole_table_of_the_first_version_is_read(
        tiny_cfg, tokenizer, tmp_path, caplog):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_cfg).eval()
    kind, cpu, ds = TaskKind.CLASSIFICATION, torch.device("cpu"), _dataset(6, per_token=False)
    path = tmp_path / "teacher" / f"{teacher_mod.fingerprint(teacher, ds, kind)}.pt"
    path.parent.mkdir()
    batch = _batch(ds, list(range(6)), tokenizer)
    rows = batch.pop(INDEX)
    with torch.no_grad():
        live = teacher(**batch).logits
    sizes, warned = _count_rows(teacher), []
    legacy = path.parent / f"{teacher_mod.fingerprints(teacher, ds, kind, (1,))[1]}.pt"
    assert legacy != path  # so a process of the first version never reads this version's files
    for content, computed in ((b"not a tensor file", 6), (torch.zeros(4, 2), 6), (live, 0)):
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif computed:
            torch.save(content, path)  # 4 rows for 6 examples
        else:
            path.unlink()
            torch.save(content, legacy)  # the first version's whole table, under its own key
        caplog.clear()
        sizes.clear()
        with caplog.at_level(logging.WARNING):
            table = teacher_table(teacher, ds, kind, str(tmp_path))
            torch.testing.assert_close(table.lookup(rows, batch, cpu).logits, live, atol=1e-5, rtol=1e-5)
        assert sum(sizes) == computed
        warned.append(caplog.text)
    assert "unreadable teacher cache" in warned[0] and "it has 4 rows for 6 examples" in warned[1]
    assert "teacher cache" not in warned[2]


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_run(tiny_cfg, tokenizer, tmp_path, caplog):
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_cfg).eval()
    ds = _dataset(4, per_token=False)
    (tmp_path / "teacher").write_text("a file where the cache folder should be")
    table = teacher_table(teacher, ds, TaskKind.CLASSIFICATION, str(tmp_path))
    batch = _batch(ds, [0, 1], tokenizer)
    table.lookup(batch.pop(INDEX), batch, torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="search.teacher"):
        table.save()
    assert "could not cache the teacher's outputs" in caplog.text and table.filled.sum() == 2


def test_a_table_without_its_teacher_says_which_rows_it_lacks(tokenizer):
    table = TeacherTable(torch.ones(3, 2), torch.tensor([True, False, True]))
    with pytest.raises(RuntimeError, match=r"no outputs for rows \[1\]"):
        table.lookup(torch.tensor([0, 1]), {"input_ids": torch.zeros(2, 4, dtype=torch.long)}, torch.device("cpu"))


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
    table = TeacherTable.full([torch.ones(2, 3), 2 * torch.ones(4, 3)], TaskKind.TOKEN_CLASSIFICATION)
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long)}
    out = table.lookup(torch.tensor([1, 0]), batch, torch.device("cpu")).logits
    assert out.shape == (2, 5, 3)
    assert out[0, :4].eq(2).all() and out[0, 4:].eq(0).all() and out[1, :2].eq(1).all() and out[1, 2:].eq(0).all()
