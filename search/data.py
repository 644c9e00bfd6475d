"""Task data: loading (hub or original local files), tokenisation with an on-disk cache, the training
set cut in two for bilevel search, and dataloaders with dynamic padding.

Every task is normalised to a small set of columns right after loading, so tokenisation does not care
where the data came from:

- sentence(-pair) classification / regression: `text_a`, `text_b` (pairs only), `label`
- token classification (CoNLL-2003): `tokens`, `ner_tags` (IOB2 ids, `search.tasks.CONLL_LABELS`)
- extractive QA (SQuAD v1.1): `id`, `question`, `context`, `answers` {`text`: [...], `answer_start`: [...]}

Local files are read in their original formats by `search.readers`, which owns `DataError` and
`iob1_to_iob2`; both are re-exported here. Bad input or a bad argument raises `DataError` with a
one-line message naming the file, column, row or value and the fix.

The bilevel split follows DARTS (arXiv:1806.09055): weights are trained on one half of the training set,
architecture logits on the other, so the architecture step sees data the weights were not fit to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from datasets import Dataset, List, load_from_disk
from torch.utils.data import DataLoader
from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

from search.readers import DataError, iob1_to_iob2, read_local, task_dir
from search.tasks import TaskKind, TaskSpec, get_task

__all__ = [
    "DataError",
    "MODEL_COLUMNS",
    "INDEX",
    "load_raw",
    "iob1_to_iob2",
    "tokenize",
    "split_for_search",
    "make_loader",
]

logger = logging.getLogger(__name__)

# Columns a HF model's forward accepts; everything else is bookkeeping (example_id, offset_mapping).
MODEL_COLUMNS = (
    "input_ids", "token_type_ids", "attention_mask", "labels", "start_positions", "end_positions",
)
# A row's number in its split, kept by make_loader when present (search/teacher.py looks rows up by it).
INDEX = "example_index"
# Bump when the tokenised layout changes, so stale caches are not reused.
_CACHE_VERSION = 1
_MIN_SEQ_LEN, _DEFAULT_MAX_SEQ_LEN = 8, 512


def _spec(task: str) -> TaskSpec:
    try:
        return get_task(task)
    except ValueError as e:
        raise DataError(str(e)) from None


# ----------------------------------------------------------------------------- loading


def load_raw(
    task: str, data_dir: str | os.PathLike | None, splits: Iterable[str] | None = None
) -> dict[str, Dataset]:
    """Load `splits` of `task` (default: train and the dev split(s)) in the normalised columns.

    With `data_dir` None the hub dataset is downloaded; otherwise the original files are read from
    `data_dir/<glue/>FOLDER`, `data_dir/FOLDER` or `data_dir` itself, in that order.
    """
    spec = _spec(task)
    splits = ("train", *spec.dev_splits) if splits is None else tuple(splits)
    if not splits:
        raise DataError(f"no splits requested for task {task!r}; pass e.g. splits=('train',)")
    if data_dir is None:
        return {split: _load_hub(spec, split) for split in splits}
    folder = task_dir(spec, Path(data_dir))
    out = {}
    for split in splits:
        try:
            name = spec.file_for(split)
        except ValueError as e:
            raise DataError(str(e)) from None
        path = folder / name
        if not path.is_file():
            raise DataError(
                f"missing file {path}: split {split!r} of task {task!r} is read from {name!r}; "
                f"put the original file there or drop the split"
            )
        ds = read_local(spec, path)
        if len(ds) == 0:
            raise DataError(f"{path} holds no examples: split {split!r} of task {task!r} is empty")
        logger.info("loaded %s/%s from %s: %d rows", task, split, path, len(ds))
        out[split] = ds
    return out


def _load_hub(spec: TaskSpec, split: str) -> Dataset:
    # Looked up at call time rather than bound at import, so tests can stand in for the hub.
    import datasets

    ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=split)
    if spec.kind in (TaskKind.CLASSIFICATION, TaskKind.REGRESSION):
        names = dict(zip(spec.hub_fields, ("text_a", "text_b"), strict=False))
        ds = ds.select_columns([*names, "label"]).rename_columns(names)
    else:
        ds = ds.select_columns(list(spec.hub_fields))
    if len(ds) == 0:
        raise DataError(f"hub dataset {spec.hub_id}/{spec.hub_config} split {split!r} is empty")
    return ds


# ----------------------------------------------------------------------------- tokenisation


def tokenize(
    raw: dict[str, Dataset],
    task: str,
    tokenizer: Any,
    max_seq_len: int,
    cache_dir: str | os.PathLike | None,
    doc_stride: int | None = None,
) -> dict[str, Dataset]:
    """Tokenise every split of `raw` for `task`, unpadded (the collator pads per batch).

    Output columns: `input_ids`, `attention_mask` (and `token_type_ids` where the tokenizer makes
    them) plus `labels` (one per token for NER: the tag on a word's first sub-token, -100 elsewhere)
    or, for SQuAD, `start_positions`/`end_positions` (the CLS index when a window misses the answer)
    and `example_id`; SQuAD splits other than `train` also keep `offset_mapping` (None outside the
    context) for `search.metrics.postprocess_qa`. Long SQuAD contexts become several windows that
    overlap by `doc_stride` tokens (default max_seq_len // 3, i.e. 128 at 384).

    With `cache_dir` set, the result is saved under `cache_dir/<task>-<key>` and reloaded on a later
    call with the same key (task, each split's content fingerprint, tokenizer, lengths).
    """
    spec = _spec(task)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"tokenizer {type(tokenizer).__name__} is not a fast (Rust) tokenizer; word_ids and "
            f"offset mappings need one: load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    max_seq_len = _check_max_seq_len(max_seq_len, tokenizer)
    if spec.kind is TaskKind.QUESTION_ANSWERING:
        doc_stride = max_seq_len // 3 if doc_stride is None else doc_stride
        if isinstance(doc_stride, bool) or not isinstance(doc_stride, int) \
                or not 0 < doc_stride < max_seq_len // 2:
            raise DataError(
                f"doc_stride={doc_stride!r} is invalid: must be an int in [1, {max_seq_len // 2 - 1}] "
                f"(below half of max_seq_len={max_seq_len})"
            )
    for split, ds in raw.items():
        if len(ds) == 0:
            raise DataError(f"split {split!r} of task {task!r} is empty; drop it or load it again")

    target = None
    if cache_dir is not None:
        key = _cache_key(raw, spec, tokenizer, max_seq_len, doc_stride)
        target = Path(cache_dir) / f"{spec.name}-{key}"
        if (target / "complete").is_file():
            logger.info("reusing tokenised %s from %s", task, target)
            return {split: load_from_disk(str(target / split)) for split in raw}

    out = {split: _tokenize_split(ds, split, spec, tokenizer, max_seq_len, doc_stride)
           for split, ds in raw.items()}
    if target is not None:
        _save(out, target)
    return out


def _check_max_seq_len(max_seq_len: Any, tokenizer: Any) -> int:
    model_max = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a known limit report a huge sentinel (int(1e30)); BERT's is 512.
    upper = model_max if isinstance(model_max, int) and model_max < 100_000 else _DEFAULT_MAX_SEQ_LEN
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, (int, np.integer)) \
            or not _MIN_SEQ_LEN <= max_seq_len <= upper:
        raise DataError(
            f"max_seq_len={max_seq_len!r} is invalid: must be an int in [{_MIN_SEQ_LEN}, {upper}] "
            f"(the tokenizer's model_max_length, else {_DEFAULT_MAX_SEQ_LEN})"
        )
    return int(max_seq_len)


def _cache_key(
    raw: dict[str, Dataset], spec: TaskSpec, tokenizer: Any, max_seq_len: int, doc_stride: int | None
) -> str:
    # A split's fingerprint is a content hash for in-memory data (so a changed file, or a select()
    # on the raw data, gives a new key) and derives from the cache files for hub data.
    payload = {
        "version": _CACHE_VERSION,
        "task": spec.name,
        "splits": {split: ds._fingerprint for split, ds in sorted(raw.items())},
        "tokenizer": {
            "class": type(tokenizer).__name__,
            "name": str(getattr(tokenizer, "name_or_path", "")),
            "vocab_size": len(tokenizer),
            "model_input_names": list(tokenizer.model_input_names),
            "backend": _tokenizer_hash(tokenizer),
        },
        "max_seq_len": max_seq_len,
        "doc_stride": doc_stride,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _tokenizer_hash(tokenizer: Any) -> str:
    # The serialised Rust tokenizer covers vocab, lower-casing, normaliser and templates; its
    # truncation/padding state changes with every call, so it is left out.
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _save(out: dict[str, Dataset], target: Path) -> None:
    # Write beside the target and rename, so an interrupted run never leaves a half cache behind.
    from search.rundir import temp_beside  # rundir -> errors -> data: imported here, not at the top

    tmp = temp_beside(target)
    shutil.rmtree(tmp, ignore_errors=True)
    for split, ds in out.items():
        ds.save_to_disk(str(tmp / split))
    (tmp / "complete").write_text("ok\n")
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved tokenised data to %s", target)


def _tokenize_split(
    ds: Dataset, split: str, spec: TaskSpec, tokenizer: Any, max_seq_len: int, doc_stride: int | None
) -> Dataset:
    if spec.kind is TaskKind.TOKEN_CLASSIFICATION:
        fn, kwargs = _encode_ner, {}
    elif spec.kind is TaskKind.QUESTION_ANSWERING:
        fn, kwargs = _encode_qa, {"doc_stride": doc_stride, "keep_offsets": split != "train"}
    else:
        fn, kwargs = _encode_sentences, {"pair": "text_b" in ds.column_names}
    return ds.map(
        fn,
        batched=True,
        remove_columns=ds.column_names,
        fn_kwargs={"tokenizer": tokenizer, "max_seq_len": max_seq_len, **kwargs},
        load_from_cache_file=False,
        desc=f"tokenising {spec.name}/{split}",
    )


def _encode_sentences(batch: dict, tokenizer: Any, max_seq_len: int, pair: bool) -> dict:
    texts = (batch["text_a"], batch["text_b"]) if pair else (batch["text_a"],)
    enc = tokenizer(*texts, truncation=True, max_length=max_seq_len)
    enc["labels"] = batch["label"]
    return enc


def _encode_ner(batch: dict, tokenizer: Any, max_seq_len: int) -> dict:
    enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_seq_len)
    labels = []
    for i, tags in enumerate(batch["ner_tags"]):
        row, previous = [], None
        for word in enc.word_ids(i):
            # Only a word's first sub-token carries its tag; the rest are ignored by the loss.
            row.append(-100 if word is None or word == previous else tags[word])
            previous = word
        labels.append(row)
    enc["labels"] = labels
    return enc


def _encode_qa(
    batch: dict, tokenizer: Any, max_seq_len: int, doc_stride: int, keep_offsets: bool
) -> dict:
    # Leading spaces in SQuAD questions only waste window room.
    questions = [q.lstrip() for q in batch["question"]]
    enc = tokenizer(
        questions,
        batch["context"],
        truncation="only_second",
        max_length=max_seq_len,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    sample_map = enc.pop("overflow_to_sample_mapping")
    offsets = enc.pop("offset_mapping")
    starts, ends, example_ids, kept_offsets = [], [], [], []
    for i, window in enumerate(offsets):
        sequence_ids = enc.sequence_ids(i)
        example = sample_map[i]
        cls_index = enc["input_ids"][i].index(tokenizer.cls_token_id)
        first = sequence_ids.index(1)
        last = len(sequence_ids) - 1 - sequence_ids[::-1].index(1)
        answers = batch["answers"][example]
        start = end = cls_index
        if answers["answer_start"]:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            if window[first][0] <= start_char and window[last][1] >= end_char:
                start = first
                while start <= last and window[start][0] <= start_char:
                    start += 1
                start -= 1
                end = last
                while end >= first and window[end][1] >= end_char:
                    end -= 1
                end += 1
        starts.append(start)
        ends.append(end)
        example_ids.append(batch["id"][example])
        if keep_offsets:
            kept_offsets.append(
                [list(o) if s == 1 else None for o, s in zip(window, sequence_ids, strict=True)]
            )
    enc["start_positions"] = starts
    enc["end_positions"] = ends
    enc["example_id"] = example_ids
    if keep_offsets:
        enc["offset_mapping"] = kept_offsets
    return enc


# ----------------------------------------------------------------------------- splits and loaders


def split_for_search(
    train: Dataset, weight_fraction: float = 0.5, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """Cut `train` into two disjoint parts: (weights part, architecture part), seeded.

    Rows sharing an `example_id` (the windows of one SQuAD question) stay on the same side.
    """
    if isinstance(weight_fraction, bool) or not isinstance(weight_fraction, (int, float)) \
            or not 0.0 < weight_fraction < 1.0:
        raise DataError(
            f"weight_fraction={weight_fraction!r} is invalid: must be a float strictly between 0 and 1"
        )
    groups = train["example_id"] if "example_id" in train.column_names else range(len(train))
    unique = list(dict.fromkeys(groups))
    n_weight = round(weight_fraction * len(unique))
    if not 0 < n_weight < len(unique):
        side = "weight" if n_weight == 0 else "architecture"
        raise DataError(
            f"weight_fraction={weight_fraction} leaves the {side} part empty for a training set of "
            f"{len(unique)} examples; use a fraction nearer 0.5 or more data"
        )
    order = np.random.default_rng(seed).permutation(len(unique))
    weight_groups = {unique[j] for j in order[:n_weight]}
    weight_rows = [i for i, g in enumerate(groups) if g in weight_groups]
    arch_rows = [i for i, g in enumerate(groups) if g not in weight_groups]
    return train.select(weight_rows), train.select(arch_rows)


def make_loader(
    ds: Dataset,
    tokenizer: Any,
    batch_size: int,
    shuffle: bool,
    seed: int,
    max_examples: int | None = None,
) -> DataLoader:
    """A DataLoader over the model columns of `ds`, padded per batch.

    NER rows (a `labels` list per row) are padded with -100 labels; `max_examples` keeps the first
    rows only (quick runs); `seed` fixes the shuffle order.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size={batch_size!r} is invalid: must be a positive int")
    if max_examples is not None:
        if max_examples < 1:
            raise DataError(f"max_examples={max_examples!r} is invalid: must be a positive int or None")
        ds = ds.select(range(min(max_examples, len(ds))))
    if len(ds) == 0:
        raise DataError("cannot build a loader over an empty dataset; check the split")
    ds = ds.select_columns([c for c in ds.column_names if c in MODEL_COLUMNS or c == INDEX])
    per_token = isinstance(ds.features.get("labels"), List)
    collator = (DataCollatorForTokenClassification(tokenizer) if per_token
                else DataCollatorWithPadding(tokenizer))
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collator,
                      generator=generator)
