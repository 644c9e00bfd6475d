"""Reading the original local data files, each into the normalised columns of `search.data`.

One reader per file format, picked by the task's kind:

- GLUE TSVs (sentence(-pair) classification / regression), read with csv.QUOTE_NONE since GLUE text
  holds bare quote characters; a header row is checked against the task's `TsvLayout`, and header-less
  files (CoLA) take their column names from it. Labels become ids; regression scores are range-checked.
- CoNLL-2003 column files (word POS chunk NER), whose IOB1 tags are converted to IOB2.
- SQuAD v1.1 JSON (data[].paragraphs[].qas[]).

Bad input raises `DataError` with a one-line message naming the file, column, row or value and the fix.
Hub loading, tokenisation and loaders live in `search.data`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, Features, List, Value

from search.tasks import TaskKind, TaskSpec

__all__ = ["DataError", "iob1_to_iob2", "read_local", "task_dir"]


class DataError(ValueError):
    """Bad data or a bad data argument; the message is one line naming the problem and the fix."""


def task_dir(spec: TaskSpec, data_dir: Path) -> Path:
    """The folder that holds `spec`'s files: the first of `data_dir/<parent>/FOLDER`, `data_dir/FOLDER`
    and `data_dir` holding any of them.
    """
    candidates = [data_dir / spec.local_parent / spec.local_dir, data_dir / spec.local_dir, data_dir]
    for folder in candidates:
        if any((folder / name).is_file() for _, name in spec.files):
            return folder
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    raise DataError(
        f"no data folder for task {spec.name!r} (expected {spec.file_for('train')!r} in one of: "
        f"{tried}); point data_dir at the folder that holds {'/'.join(filter(None, (spec.local_parent, spec.local_dir)))}/"
    )


def read_local(spec: TaskSpec, path: Path) -> Dataset:
    """Read one original-format file of task `spec` into the normalised columns."""
    try:
        return _READERS[spec.kind](spec, path)
    except UnicodeDecodeError as e:  # a file saved as Latin-1 or cp1252
        raise DataError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                        f"save it as UTF-8") from None


def _read_tsv(spec: TaskSpec, path: Path) -> Dataset:
    layout = spec.tsv
    assert layout is not None  # the registry gives every sentence-level task a layout
    needed = [c for c in (layout.text_a, layout.text_b, layout.label) if c is not None]
    regression = spec.kind is TaskKind.REGRESSION
    lookup = {**spec.label_to_id, **{str(i): i for i in range(len(spec.label_names))}}
    rows: dict[str, list] = {"text_a": [], "text_b": [], "label": []}
    # utf-8-sig: the MRPC files open with a byte-order mark that would otherwise glue onto "Quality".
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if layout.column_names is None:
            columns = next(reader, None) or []
            missing = [c for c in needed if c not in columns]
            if missing:
                raise DataError(
                    f"{path}: header does not match task {spec.name!r}: expected columns {needed}, "
                    f"found {columns} (missing {missing}); use the original GLUE file"
                )
        else:
            columns = list(layout.column_names)
        index = {c: columns.index(c) for c in needed}
        for row in reader:
            if not row:
                continue  # a trailing blank line
            short = len(row) <= max(index.values())
            if short or layout.column_names is not None and len(row) != len(columns):
                raise DataError(
                    f"{path} line {reader.line_num}: {len(row)} tab-separated fields, expected "
                    f"{len(columns)} {columns} for task {spec.name!r}; use the original GLUE file"
                )
            raw = row[index[layout.label]].strip()
            rows["label"].append(
                _parse_score(raw, layout.label_range, path, reader.line_num) if regression
                else _parse_label(raw, lookup, path, reader.line_num)
            )
            rows["text_a"].append(row[index[layout.text_a]])
            if layout.text_b is not None:
                rows["text_b"].append(row[index[layout.text_b]])
    label = Value("float32") if regression else ClassLabel(names=list(spec.label_names))
    features = {"text_a": Value("string")}
    if layout.text_b is None:
        del rows["text_b"]
    else:
        features["text_b"] = Value("string")
    features["label"] = label
    return Dataset.from_dict(rows, features=Features(features))


def _parse_label(raw: str, lookup: dict[str, int], path: Path, line: int) -> int:
    if raw not in lookup:
        raise DataError(
            f"{path} line {line}: label {raw!r} is not in the label set {sorted(lookup)}; "
            f"fix the row or check that the file belongs to this task"
        )
    return lookup[raw]


def _parse_score(raw: str, bounds: tuple[float, float] | None, path: Path, line: int) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value) or bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise DataError(
            f"{path} line {line}: score {raw!r} is not a number in {list(bounds or ('-inf', 'inf'))}; "
            f"fix the row or check that the file belongs to this task"
        )
    return value


def iob1_to_iob2(tags: list[str]) -> list[str]:
    """IOB1 -> IOB2: an I- tag that opens an entity (after O or another type) becomes B-.

    IOB1 only uses B- between two adjacent entities of one type, so IOB2 input comes back unchanged.
    """
    out = []
    for i, tag in enumerate(tags):
        if tag.startswith("I-"):
            prev = out[i - 1] if i else "O"
            if prev == "O" or prev[2:] != tag[2:]:
                tag = "B-" + tag[2:]
        out.append(tag)
    return out


def _read_conll(spec: TaskSpec, path: Path) -> Dataset:
    lookup = spec.label_to_id
    sentences: list[list[str]] = []
    tags: list[list[int]] = []
    words: list[str] = []
    raw_tags: list[str] = []

    def close() -> None:
        if words:
            sentences.append(list(words))
            tags.append([lookup[t] for t in iob1_to_iob2(raw_tags)])
            words.clear()
            raw_tags.clear()

    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            parts = line.split()
            # -DOCSTART- lines may open or close a document (both occur in public copies): drop them.
            if not parts or parts[0] == "-DOCSTART-":
                close()
                continue
            if len(parts) < 2:
                raise DataError(
                    f"{path} line {n}: {len(parts)} column, expected 'word POS chunk NER' "
                    f"(space-separated, NER tag last)"
                )
            # Every IOB1 tag is also an IOB2 tag, so one lookup validates both schemes.
            if parts[-1] not in lookup:
                raise DataError(
                    f"{path} line {n}: NER tag {parts[-1]!r} is not in the label set "
                    f"{list(spec.label_names)}; the last column must be the NER tag"
                )
            words.append(parts[0])
            raw_tags.append(parts[-1])
        close()
    features = Features({
        "tokens": List(Value("string")),
        "ner_tags": List(ClassLabel(names=list(spec.label_names))),
    })
    return Dataset.from_dict({"tokens": sentences, "ner_tags": tags}, features=features)


def _read_squad(spec: TaskSpec, path: Path) -> Dataset:
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
            f"use the original SQuAD v1.1 file"
        ) from None
    rows: dict[str, list] = {"id": [], "question": [], "context": [], "answers": []}
    try:
        for article in data["data"]:
            for paragraph in article["paragraphs"]:
                context = paragraph["context"]
                for qa in paragraph["qas"]:
                    _check_answers(path, qa, context)
                    rows["id"].append(str(qa["id"]))
                    rows["question"].append(qa["question"])
                    rows["context"].append(context)
                    rows["answers"].append({
                        "text": [a["text"] for a in qa["answers"]],
                        "answer_start": [int(a["answer_start"]) for a in qa["answers"]],
                    })
    except (KeyError, TypeError) as e:
        raise DataError(
            f"{path} does not follow the SQuAD v1.1 layout data[].paragraphs[].qas[] "
            f"(bad or missing key {e}); use the original SQuAD v1.1 file"
        ) from None
    features = Features({
        "id": Value("string"),
        "question": Value("string"),
        "context": Value("string"),
        "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))},
    })
    return Dataset.from_dict(rows, features=features)


def _check_answers(path: Path, qa: dict, context: str) -> None:
    """SQuAD v1.1: every question has an answer, and every answer lies inside its context; a span past its end
    would train the model on the wrong tokens without a word."""
    if not qa["answers"]:
        raise DataError(f"{path}: question {qa['id']!r} has no answer; SQuAD v1.1 questions all have one "
                        f"(v2's unanswerable questions are not supported)")
    for a in qa["answers"]:
        start, text = int(a["answer_start"]), a["text"]
        if start < 0 or start + len(text) > len(context):
            raise DataError(f"{path}: question {qa['id']!r}: answer_start {start} with a {len(text)}-character answer "
                            f"lies outside its {len(context)}-character context; fix the offset")


_READERS = {
    TaskKind.CLASSIFICATION: _read_tsv,
    TaskKind.REGRESSION: _read_tsv,
    TaskKind.TOKEN_CLASSIFICATION: _read_conll,
    TaskKind.QUESTION_ANSWERING: _read_squad,
}
