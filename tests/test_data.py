"""search/data.py and search/tasks.py: every local layout, normalisation, tokenisation (NER first
sub-token labels, SQuAD windows), the cache, the bilevel split, loaders, and one-line DataErrors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from datasets import Dataset

import search.data as data_mod
from data_fixtures import (
    GLUE_FILES, GLUE_TASK_DIRS, SQUAD, SQUAD_CONTEXT, real_assets, real_tokenizer, tiny_tokenizer,
    write_conll, write_glue, write_squad,
)
from search.data import DataError, iob1_to_iob2, load_raw, make_loader, split_for_search, tokenize
from search.metrics import postprocess_qa
from search.tasks import CONLL_LABELS, TASKS, TaskKind, get_task


def _one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message
    return message


@pytest.fixture
def tok(tmp_path):
    return tiny_tokenizer(tmp_path / "tokenizer")


# ----------------------------------------------------------------------------- registry


def test_registry_covers_all_tasks():
    assert set(TASKS) == set(GLUE_TASK_DIRS) | {"conll03", "squad"}
    for spec in TASKS.values():
        assert spec.main_metric in spec.metrics
        assert spec.dev_splits
    assert get_task("stsb").num_labels == 1 and get_task("stsb").kind is TaskKind.REGRESSION
    assert get_task("conll03").num_labels == 9 and get_task("squad").num_labels == 2
    assert get_task("mnli").num_labels == 3 and get_task("mnli").main_metric == "accuracy_m"
    assert get_task("sst2").file_for("test_labeled") == "test-labeled.tsv"


def test_get_task_unknown_lists_names():
    with pytest.raises(ValueError, match="sst2") as info:
        get_task("sst-3")
    assert "\n" not in str(info.value) and "sst-3" in str(info.value)


# ----------------------------------------------------------------------------- GLUE layouts

EXPECTED_TRAIN = {
    "cola": ([("Our friends won't buy this analysis.", None, 1), ('He said "go home .', None, 0),
              ('The "quoted" word stays.', None, 1)]),
    "sst2": [("hide new secretions ", None, 0), ('" a movie " that \'s "great', None, 1)],
    "mrpc": [('Amrozi called him "the witness".', 'He called him "the witness', 1),
             ("Yucaipa owned it.", "Yucaipa sold it.", 0)],
    "stsb": [("A plane is taking off.", "An air plane is taking off.", 5.0),
             ('A man plays a "flute".', "A man plays a flute.", 3.8)],
    "qqp": [('How is "life"?', "What is life like?", 1), ("Why?", "How?", 0)],
    "mnli": [('Conceptually "cream" skimming.', "Product and geography.", 1),
             ("you know.", "You know.", 0)],
    "qnli": [("When did it start?", 'It started in "1990".', 0), ("Who?", "Nobody knows.", 1)],
    "rte": [('No Weapons Found in "Iraq" Yet.', "Weapons Found in Iraq.", 1),
            ("A place of sorrow.", "Pope died.", 0)],
    "wnli": [("I stuck a pin through a carrot.", "The carrot had a hole.", 1),
             ("John couldn't see.", "John was short.", 0)],
}


@pytest.mark.parametrize("task", sorted(EXPECTED_TRAIN))
def test_glue_layouts(tmp_path, task):
    write_glue(tmp_path, GLUE_TASK_DIRS[task])
    raw = load_raw(task, tmp_path)
    assert set(raw) == {"train", *get_task(task).dev_splits}
    train = raw["train"]
    pair = get_task(task).is_pair
    assert train.column_names == (["text_a", "text_b", "label"] if pair else ["text_a", "label"])
    got = [(r["text_a"], r.get("text_b"), r["label"]) for r in train]
    assert [g[:2] for g in got] == [e[:2] for e in EXPECTED_TRAIN[task]]
    np.testing.assert_allclose([g[2] for g in got], [e[2] for e in EXPECTED_TRAIN[task]], rtol=1e-6)
    for split in get_task(task).dev_splits:
        assert len(raw[split]) == 1


def test_mnli_matched_and_mismatched(tmp_path):
    write_glue(tmp_path, "MNLI")
    raw = load_raw("mnli", tmp_path, ["validation_matched", "validation_mismatched"])
    assert raw["validation_matched"][0]["label"] == 1  # neutral
    assert raw["validation_mismatched"][0]["label"] == 2  # contradiction
    assert raw["validation_mismatched"][0]["text_b"] == "No gift."


def test_extra_split_and_folder_resolution(tmp_path):
    folder = write_glue(tmp_path, "SST-2")
    labeled = load_raw("sst2", tmp_path, ["test_labeled"])["test_labeled"]
    assert labeled["label"] == [0, 1] and labeled[1]["text_a"] == 'an "ok" film'
    # data_dir may also be the glue folder or the task folder itself.
    assert len(load_raw("sst2", tmp_path / "glue", ["train"])["train"]) == 2
    assert len(load_raw("sst2", folder, ["train"])["train"]) == 2


def test_hub_path_is_normalised(monkeypatch):
    import datasets

    hub = {
        ("nyu-mll/glue", "mnli"): Dataset.from_dict(
            {"premise": ["p"], "hypothesis": ["h"], "label": [2], "idx": [0]}),
        ("eriktks/conll2003", None): Dataset.from_dict(
            {"id": ["0"], "tokens": [["EU"]], "pos_tags": [[1]], "chunk_tags": [[2]], "ner_tags": [[3]]}),
        ("rajpurkar/squad", None): Dataset.from_dict(
            {"id": ["q"], "title": ["t"], "context": ["c"], "question": ["q?"],
             "answers": [{"text": ["c"], "answer_start": [0]}]}),
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: hub[(name, config)])
    assert load_raw("mnli", None, ["train"])["train"][0] == {"text_a": "p", "text_b": "h", "label": 2}
    assert load_raw("conll03", None, ["train"])["train"].column_names == ["tokens", "ner_tags"]
    assert load_raw("squad", None, ["train"])["train"].column_names == [
        "id", "question", "context", "answers"]


# ----------------------------------------------------------------------------- CoNLL and SQuAD


def test_iob1_to_iob2_hand_example():
    iob1 = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "I-ORG", "I-MISC"]
    assert iob1_to_iob2(iob1) == ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "B-ORG", "B-MISC"]
    iob2 = ["B-PER", "I-PER", "B-PER", "O", "B-ORG"]
    assert iob1_to_iob2(iob2) == iob2


def test_conll_docstart_anywhere_and_iob2(tmp_path):
    write_conll(tmp_path)
    raw = load_raw("conll03", tmp_path, ["train", "validation", "test"])
    assert {k: len(v) for k, v in raw.items()} == {"train": 3, "validation": 1, "test": 1}
    train = raw["train"]
    assert train[0]["tokens"] == ["EU", "rejects", "German", "call", "."]
    assert train[2]["tokens"] == ["BRUSSELS", "1996-08-22"]
    tags = [[CONLL_LABELS[i] for i in row] for row in train["ner_tags"]]
    assert tags[0] == ["B-ORG", "O", "B-MISC", "O", "O"]
    assert tags[1] == ["B-PER", "I-PER", "B-PER", "I-PER", "O"]
    assert tags[2] == ["B-LOC", "O"]


def test_squad_json(tmp_path):
    write_squad(tmp_path)
    raw = load_raw("squad", tmp_path)
    row = raw["validation"][1]
    assert row["id"] == "q2" and row["context"] == SQUAD_CONTEXT
    start = row["answers"]["answer_start"][0]
    assert row["context"][start: start + len("France")] == "France"
    assert raw["train"][0]["answers"]["text"] == ["The Normans", "Normans"]


# ----------------------------------------------------------------------------- tokenisation


def test_sentence_pair_tokenisation_and_loader(tmp_path, tok):
    write_glue(tmp_path, "STS-B")
    out = tokenize(load_raw("stsb", tmp_path), "stsb", tok, 32, None)
    assert set(out["train"].column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    first = out["train"][0]
    assert first["input_ids"][0] == tok.cls_token_id and 1 in first["token_type_ids"]
    batch = next(iter(make_loader(out["train"], tok, batch_size=2, shuffle=False, seed=0)))
    assert batch["labels"].dtype == torch.float32 and batch["input_ids"].shape[0] == 2
    assert batch["attention_mask"].sum(1).tolist() == [len(r["input_ids"]) for r in out["train"]]


def test_truncation_respects_max_seq_len(tmp_path, tok):
    ds = Dataset.from_dict({"text_a": ["the cat sat on the mat . " * 20], "label": [1]})
    out = tokenize({"train": ds}, "sst2", tok, 16, None)
    assert len(out["train"][0]["input_ids"]) == 16


def test_ner_first_subtoken_labels_tiny(tok):
    tags = [CONLL_LABELS.index(t) for t in ("B-LOC", "O", "B-ORG")]
    ds = Dataset.from_dict({"tokens": [["Washington", "unaffable", "EU"]], "ner_tags": [tags]})
    out = tokenize({"train": ds}, "conll03", tok, 32, None)["train"][0]
    assert tok.convert_ids_to_tokens(out["input_ids"]) == [
        "[CLS]", "wash", "##ing", "##ton", "un", "##aff", "##able", "eu", "[SEP]"]
    assert out["labels"] == [-100, tags[0], -100, -100, tags[1], -100, -100, tags[2], -100]
    batch = next(iter(make_loader(
        tokenize({"train": Dataset.from_dict({"tokens": [["EU"], ["the", "cat", "sat"]],
                                              "ner_tags": [[3], [0, 0, 0]]})},
                 "conll03", tok, 32, None)["train"], tok, 2, False, 0)))
    assert batch["labels"].tolist()[0] == [-100, 3, -100, -100, -100]  # padded with -100


def _qa_examples(n_words: int = 60, answer_words: tuple[int, int] = (40, 41)):
    words = [f"w{i}" for i in range(n_words)]
    context = " ".join(words)
    answer = " ".join(words[answer_words[0]: answer_words[1] + 1])
    return Dataset.from_dict({
        "id": ["long", "short"],
        "question": ["where is it ?", "who ?"],
        "context": [context, "the cat sat on the mat ."],
        "answers": [{"text": [answer], "answer_start": [context.index(answer + " ")]},
                    {"text": ["the mat"], "answer_start": [15]}],
    }), answer


def test_squad_windows_and_postprocess(tok):
    examples, answer = _qa_examples()
    out = tokenize({"train": examples, "validation": examples}, "squad", tok, 24, None, doc_stride=6)
    train, dev = out["train"], out["validation"]
    assert "offset_mapping" not in train.column_names and "offset_mapping" in dev.column_names
    long_rows = [i for i, e in enumerate(dev["example_id"]) if e == "long"]
    assert len(long_rows) >= 4  # 60 words in windows of 24 - 6 (question + specials) tokens
    with_answer = [i for i in long_rows if dev[i]["start_positions"] != 0]
    without = [i for i in long_rows if dev[i]["start_positions"] == 0]
    assert with_answer and without  # CLS index marks windows that miss the answer
    context = examples[0]["context"]
    for i in with_answer:
        row = dev[i]
        span = context[row["offset_mapping"][row["start_positions"]][0]:
                       row["offset_mapping"][row["end_positions"]][1]]
        assert span == answer
    assert dev[0]["offset_mapping"][0] is None  # CLS / question tokens carry no offset

    n, width = len(dev), max(len(r) for r in dev["input_ids"])
    start, end = np.zeros((n, width)), np.zeros((n, width))
    for i, row in enumerate(dev):
        start[i, row["start_positions"]] += 10.0
        end[i, row["end_positions"]] += 10.0
        if i in without:  # a weaker decoy span in the windows without the answer
            start[i, 8] += 5.0
            end[i, 9] += 5.0
    preds = postprocess_qa(examples, dev, start, end)
    assert preds == {"long": answer, "short": "the mat"}
    batch = next(iter(make_loader(dev, tok, batch_size=n, shuffle=False, seed=0)))
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions"}
    assert batch["start_positions"].tolist() == dev["start_positions"]


def test_squad_fixture_file_round_trip(tmp_path, tok):
    write_squad(tmp_path)
    raw = load_raw("squad", tmp_path, ["validation"])
    dev = tokenize(raw, "squad", tok, 32, None)["validation"]
    assert dev["example_id"] == ["q1", "q2"]
    row = dev[1]
    assert SQUAD_CONTEXT[row["offset_mapping"][row["start_positions"]][0]:
                         row["offset_mapping"][row["end_positions"]][1]] == "France"


def test_tokenise_cache_reuse_and_invalidation(tmp_path, tok, monkeypatch):
    write_glue(tmp_path, "RTE")
    raw = load_raw("rte", tmp_path)
    cache = tmp_path / "cache"
    first = tokenize(raw, "rte", tok, 32, cache)
    assert len(list(cache.iterdir())) == 1

    def fail(*args, **kwargs):
        raise AssertionError("tokenised again instead of reusing the cache")

    monkeypatch.setattr(data_mod, "_tokenize_split", fail)
    again = tokenize(load_raw("rte", tmp_path), "rte", tok, 32, cache)
    assert again["train"]["input_ids"] == first["train"]["input_ids"]
    monkeypatch.undo()
    tokenize(raw, "rte", tok, 16, cache)  # another max_seq_len: another key
    (tmp_path / "glue" / "RTE" / "dev.tsv").write_text(
        "index\tsentence1\tsentence2\tlabel\n0\tEdited.\tChanged.\tnot_entailment\n")
    tokenize(load_raw("rte", tmp_path), "rte", tok, 32, cache)  # edited file: another key
    assert len([p for p in cache.iterdir() if ".tmp" not in p.name]) == 3


# ----------------------------------------------------------------------------- split and loader


def test_split_for_search_disjoint_and_seeded():
    ds = Dataset.from_dict({"input_ids": [[i] for i in range(101)], "labels": list(range(101))})
    w, a = split_for_search(ds, 0.3, seed=1)
    assert len(w) == 30 and len(a) == 71
    assert set(w["labels"]).isdisjoint(a["labels"]) and set(w["labels"]) | set(a["labels"]) == set(range(101))
    assert split_for_search(ds, 0.3, seed=1)[0]["labels"] == w["labels"]
    assert split_for_search(ds, 0.3, seed=2)[0]["labels"] != w["labels"]


def test_split_for_search_keeps_squad_windows_together():
    ds = Dataset.from_dict({"example_id": ["a", "a", "b", "c", "c", "c", "d"], "labels": list(range(7))})
    w, a = split_for_search(ds, 0.5, seed=0)
    assert set(w["example_id"]).isdisjoint(a["example_id"]) and len(w) + len(a) == 7


def test_make_loader_drops_columns_caps_and_seeds(tok):
    ds = Dataset.from_dict({
        "input_ids": [[2, 5 + i, 3] for i in range(10)], "attention_mask": [[1, 1, 1]] * 10,
        "labels": list(range(10)), "example_id": [str(i) for i in range(10)],
    })
    loader = make_loader(ds, tok, batch_size=4, shuffle=True, seed=3, max_examples=6)
    batches = list(loader)
    assert sum(len(b["labels"]) for b in batches) == 6 and "example_id" not in batches[0]
    order = [b["labels"].tolist() for b in make_loader(ds, tok, 4, True, 3, 6)]
    assert order == [b["labels"].tolist() for b in batches]


# ----------------------------------------------------------------------------- bad input


def test_error_missing_folder(tmp_path):
    msg = _one_line_error(load_raw, "sst2", tmp_path / "nowhere")
    assert "train.tsv" in msg and "SST-2" in msg and "nowhere" in msg
    assert msg.endswith("point data_dir at the folder that holds glue/SST-2/")
    assert _one_line_error(load_raw, "squad", tmp_path / "nowhere").endswith("the folder that holds squad/")


def test_error_missing_file(tmp_path):
    write_glue(tmp_path, "SST-2", {"train.tsv": GLUE_FILES["SST-2"]["train.tsv"]})
    msg = _one_line_error(load_raw, "sst2", tmp_path)
    assert "dev.tsv" in msg and "validation" in msg


def test_error_columns_do_not_match(tmp_path):
    write_glue(tmp_path, "SST-2", {"train.tsv": "text\tlabel\nfine\t1\n"})
    msg = _one_line_error(load_raw, "sst2", tmp_path, ["train"])
    assert "'sentence'" in msg and "'text'" in msg and "train.tsv" in msg


def test_error_cola_wrong_column_count(tmp_path):
    write_glue(tmp_path, "CoLA", {"train.tsv": "gj04\t1\t\tfine.\ngj04\t1\n"})
    msg = _one_line_error(load_raw, "cola", tmp_path, ["train"])
    assert "line 2" in msg and "train.tsv" in msg and "4" in msg


@pytest.mark.parametrize("task, folder, text, value", [
    ("sst2", "SST-2", "sentence\tlabel\nok\t1\nbad\t2\n", "'2'"),
    ("rte", "RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", "'maybe'"),
    ("stsb", "STS-B", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
                      "\tscore\n0\tg\tf\ty\t0\tn\tn\ta\tb\t7.5\n", "'7.5'"),
])
def test_error_label_outside_label_set(tmp_path, task, folder, text, value):
    write_glue(tmp_path, folder, {"train.tsv": text})
    msg = _one_line_error(load_raw, task, tmp_path, ["train"])
    assert value in msg and "train.tsv" in msg and "line" in msg


def test_error_conll_bad_tag(tmp_path):
    (tmp_path / "conll2003").mkdir()
    (tmp_path / "conll2003" / "eng.train").write_text("EU NNP I-NP I-ORG\nx NN I-NP I-NP\n")
    msg = _one_line_error(load_raw, "conll03", tmp_path, ["train"])
    assert "'I-NP'" in msg and "eng.train line 2" in msg


def test_error_empty_split(tmp_path, tok):
    write_glue(tmp_path, "SST-2", {"train.tsv": "sentence\tlabel\n"})
    msg = _one_line_error(load_raw, "sst2", tmp_path, ["train"])
    assert "empty" in msg and "train.tsv" in msg
    with pytest.raises(DataError, match="empty"):
        tokenize({"train": Dataset.from_dict({"text_a": [], "label": []})}, "sst2", tok, 32, None)


def test_error_unknown_task_and_split(tmp_path):
    msg = _one_line_error(load_raw, "glue-foo", tmp_path)
    assert "glue-foo" in msg and "sst2" in msg
    write_conll(tmp_path)
    assert "validation" in _one_line_error(load_raw, "conll03", tmp_path, ["dev"])


def test_error_malformed_json(tmp_path):
    (tmp_path / "squad").mkdir()
    (tmp_path / "squad" / "dev-v1.1.json").write_text('{"data": [')
    msg = _one_line_error(load_raw, "squad", tmp_path, ["validation"])
    assert "dev-v1.1.json" in msg and "JSON" in msg
    (tmp_path / "squad" / "dev-v1.1.json").write_text(json.dumps({"data": [{"title": "x"}]}))
    msg = _one_line_error(load_raw, "squad", tmp_path, ["validation"])
    assert "'paragraphs'" in msg


@pytest.mark.parametrize("answers, message", [
    ([{"text": "France", "answer_start": 500}], "'q2': answer_start 500 with a 6-character answer lies outside"),
    ([], "question 'q2' has no answer"),  # SQuAD v2's unanswerable questions
])
def test_error_squad_answer_outside_its_context(tmp_path, answers, message):
    data = json.loads(json.dumps(SQUAD))
    data["data"][0]["paragraphs"][0]["qas"][1]["answers"] = answers
    write_squad(tmp_path, data)
    msg = _one_line_error(load_raw, "squad", tmp_path, ["train"])
    assert "train-v1.1.json" in msg and message in msg


@pytest.mark.parametrize("task, folder, name", [("sst2", "SST-2", "SST-2/train.tsv"),
                                               ("conll03", "conll2003", "conll2003/eng.train")])
def test_error_a_file_that_is_not_utf8(tmp_path, task, folder, name):
    (tmp_path / folder).mkdir()
    text = "sentence\tlabel\ncaf\xe9 au lait\t1\n" if task == "sst2" else "caf\xe9 NN I-NP O\n"
    (tmp_path / name).write_bytes(text.encode("latin-1"))
    msg = _one_line_error(load_raw, task, tmp_path, ["train"])
    assert name.split("/")[1] in msg and "is not UTF-8 text (byte 0xe9" in msg and "save it as UTF-8" in msg


@pytest.mark.parametrize("bad", [4, 513, 10_000, "128", 128.0, True, None])
def test_error_bad_max_seq_len(tok, bad):
    ds = {"train": Dataset.from_dict({"text_a": ["a"], "label": [0]})}
    msg = _one_line_error(tokenize, ds, "sst2", tok, bad, None)
    assert "max_seq_len" in msg and "512" in msg


def test_error_slow_tokenizer():
    class Slow:
        is_fast = False

    ds = {"train": Dataset.from_dict({"text_a": ["a"], "label": [0]})}
    assert "fast" in _one_line_error(tokenize, ds, "sst2", Slow(), 32, None)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.2, True, 0.001])
def test_error_bad_fraction(fraction):
    ds = Dataset.from_dict({"labels": list(range(10))})
    assert "weight_fraction" in _one_line_error(split_for_search, ds, fraction)


# ----------------------------------------------------------------------------- real assets

REAL_COUNTS = {
    "sst2": (67_349, 872), "mrpc": (3_668, 408), "cola": (8_551, 1_043),
    "stsb": (5_749, 1_500), "rte": (2_490, 277),
}


@pytest.mark.assets
@pytest.mark.parametrize("task", sorted(REAL_COUNTS))
def test_real_glue_files(task):
    assets = real_assets()
    tok = real_tokenizer(assets)
    raw = load_raw(task, assets)
    assert (len(raw["train"]), len(raw["validation"])) == REAL_COUNTS[task]
    small = {split: ds.select(range(200)) for split, ds in raw.items()}
    out = tokenize(small, task, tok, 128, None)
    lengths = [len(ids) for ids in out["train"]["input_ids"]]
    assert max(lengths) <= 128 and min(lengths) >= 3
    if task == "sst2":
        assert len(load_raw(task, assets, ["test_labeled"])["test_labeled"]) == 1_821


@pytest.mark.assets
def test_real_conll_files():
    assets = real_assets()
    tok = real_tokenizer(assets)
    raw = load_raw("conll03", assets, ["train", "validation", "test"])
    assert [len(raw[s]) for s in ("train", "validation", "test")] == [14_041, 3_250, 3_453]
    for tags in raw["train"].select(range(2000))["ner_tags"]:  # valid IOB2 after conversion
        names = [CONLL_LABELS[t] for t in tags]
        assert iob1_to_iob2(names) == names
    out = tokenize({"validation": raw["validation"].select(range(300))}, "conll03", tok, 128, None)
    for words, row in zip(raw["validation"].select(range(300)), out["validation"], strict=True):
        labelled = [label for label in row["labels"] if label != -100]
        assert labelled == words["ner_tags"][: len(labelled)]


@pytest.mark.assets
def test_real_wordpiece_first_subtoken():
    tok = real_tokenizer(real_assets())
    ds = Dataset.from_dict({"tokens": [["Washington", "unaffable", "EU"]], "ner_tags": [[5, 0, 3]]})
    row = tokenize({"train": ds}, "conll03", tok, 32, None)["train"][0]
    pieces = tok.convert_ids_to_tokens(row["input_ids"])
    assert pieces[2:5] == ["una", "##ffa", "##ble"]
    assert row["labels"] == [-100, 5, 0, -100, -100, 3, -100]
