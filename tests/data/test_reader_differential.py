"""sora-tune's reader against reference readings, on seeded generated files.

Each file is written with a standard writer (the csv module, json, pyarrow.parquet) and read
back two ways: by training (`load_own_data`) and by a reference reading (the csv module with
the file's dialect, json, pyarrow), from which the expected rows, texts and label names follow
by the rules in sora_tune/data/files.py's docstring, written again here in plain Python. They
must agree exactly, or training must refuse the file in one line naming the planted defect's
row. `predict` reads the texts with the same reader; it must read the same texts.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sora_tune.data import DataLocation, load_own_data, read_table

FILES_PER_FORMAT = 80
FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
# Cells that trip readers: quotes, unicode, emoji, the spellings of missing values, spaces.
WORDS = ['"', "'", "say \"hi\"", "NA", "None", "null", "nan", "True", "0", "1.5", "é", "日本",
         "🙂", "a,b", ";", "\\", "  padded ", "x"]  # fmt: skip
ONLY_QUOTED_CSV = ["line\nbreak", "tab\there", "cr\r\nlf"]  # a TSV cannot hold these
TSV = {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "quotechar": None}  # no quoting at all
LABEL_KINDS = ("text", "int", "bool", "float-classes", "scores")
INTEGER, NUMBER = re.compile(r"[+-]?\d+"), re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
BOOLEANS = {"True": True, "true": True, "TRUE": True, "False": False, "false": False}
BOOLEANS |= {"FALSE": False}


def make_case(seed: int, suffix: str) -> dict:
    """Rows of one generated file: texts, labels of one kind, maybe a planted defect."""
    rng = random.Random(seed)
    words = WORDS + (ONLY_QUOTED_CSV if suffix == ".csv" else [])
    kind = rng.choice(LABEL_KINDS)
    n_rows = rng.randint(2, 12)
    values = {
        "text": ["pos", "neg", "pos neutral", "日本", "NA"],
        "int": [0, 1, 2, 10, -3],
        "bool": [True, False],
        "float-classes": [0.0, 1.0, 0.5, 2.25],
        "scores": [0.1, 2.5, 3.0, 4.75, 1e-3],
    }[kind]
    labels = [values[i % 2] if i < 2 else rng.choice(values) for i in range(n_rows)]
    texts = [
        rng.choice(["", " "]) + " ".join(rng.choices(words, k=rng.randint(1, 3))) + "."
        for _ in range(n_rows)
    ]
    pairs = [rng.choice(words) + " ok" for _ in range(n_rows)]
    if kind == "text" and rng.random() < 0.5:  # a whitespace variant of a class, or a new one
        spaced = rng.randrange(n_rows)
        labels[spaced] = rng.choice([" ", "", "\u00a0"]) + labels[spaced] + rng.choice([" ", ""])
    defect = rng.choice([None, None, None, "empty-text", "missing-label"])
    row = rng.randrange(n_rows)
    if defect == "empty-text":
        pairs[row] = rng.choice([None, ""]) if suffix != ".parquet" else None
    elif defect == "missing-label":
        labels[row] = None
    return {"texts": texts, "pairs": pairs, "labels": labels, "kind": kind, "defect": defect,
            "row": row + 1}  # fmt: skip


def write(path: Path, case: dict) -> None:
    columns = {"text": case["texts"], "reply": case["pairs"], "label": case["labels"]}
    rows = [dict(zip(columns, cells, strict=True)) for cells in zip(*columns.values(), strict=True)]
    if path.suffix in (".csv", ".tsv"):
        dialect = TSV if path.suffix == ".tsv" else {}
        with open(path, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file, **dialect)
            writer.writerow(columns)
            writer.writerows(["" if c is None else c for c in row.values()] for row in rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    else:
        pq.write_table(pa.table(columns), path)


def reference_rows(path: Path) -> list[dict]:
    """The file read with the standard library (or pyarrow for Parquet): empty cells None."""
    if path.suffix in (".csv", ".tsv"):
        dialect = TSV if path.suffix == ".tsv" else {}
        with open(path, newline="", encoding="utf-8") as file:
            header, *rows = [r for r in csv.reader(file, **dialect) if r]
        return [{h: (c if c != "" else None) for h, c in zip(header, r, strict=True)} for r in rows]
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return pq.read_table(path).to_pylist()


def typed(labels: list, from_text: bool) -> list:
    """CSV and TSV labels typed as the reader types them: integers, numbers or booleans alone."""
    if not from_text:
        return labels
    if all(INTEGER.fullmatch(v) for v in labels):
        return [int(v) for v in labels]
    if all(NUMBER.fullmatch(v) for v in labels):
        return [float(v) for v in labels]
    if all(v in BOOLEANS for v in labels):
        return [BOOLEANS[v] for v in labels]
    return labels


def canonical(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def expected(path: Path, case: dict) -> dict:
    """What training must make of the file, from the reference reading; or the refusal."""
    rows = reference_rows(path)
    if any(r["reply"] is None or not r["reply"].strip() for r in rows):
        first = next(
            i for i, r in enumerate(rows, 1) if r["reply"] is None or not r["reply"].strip()
        )
        return {
            "refused": rf"column 'reply' has \d+ empty or missing text cell\(s\), the first in row {first}"
        }
    raw = [r["label"] for r in rows]
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in raw):
        first = next(i for i, v in enumerate(raw, 1) if v is None)
        return {
            "refused": rf"label column 'label' has \d+ missing cell\(s\), the first in row {first}"
        }
    labels = typed(raw, path.suffix in (".csv", ".tsv"))
    texts = [r["text"] for r in rows]
    if case["kind"] == "scores":
        return {"texts": texts, "scores": [float(v) for v in labels]}
    names = [canonical(v) for v in sorted(set(labels))]
    if len({name.strip() for name in names}) < len(names):
        return {"refused": "label column 'label' spells one class two ways"}
    if len(names) < 2:
        return {"refused": "has a single class"}
    return {"texts": texts, "labels": [canonical(v) for v in labels], "names": names}


def read(path: Path, case: dict) -> dict:
    kind = "single_label_classification" if case["kind"] == "float-classes" else None
    data = load_own_data(
        DataLocation(train_file=str(path)),
        text_columns=("text", "reply"),
        problem_type=kind,
    )
    train = data.raw["train"]
    if data.task.label_names is None:
        return {"texts": train["text"], "scores": train["label"]}
    names = list(data.task.label_names)
    return {"texts": train["text"], "labels": [names[i] for i in train["label"]], "names": names}


@pytest.mark.parametrize("suffix", FORMATS)
def test_training_reads_generated_files_as_the_reference_does(tmp_path, suffix):
    agreed = refused = 0
    for seed in range(FILES_PER_FORMAT):
        case = make_case(seed, suffix)
        path = tmp_path / f"case-{seed}{suffix}"
        write(path, case)
        want = expected(path, case)
        if "refused" in want:
            with pytest.raises(ValueError) as refusal:
                read(path, case)
            message = str(refusal.value)
            assert "\n" not in message and message.startswith(str(path)), (seed, message)
            assert re.search(want["refused"], message), (seed, message, want)
            refused += 1
            continue
        got = read(path, case)
        if "scores" in want:
            assert got["texts"] == want["texts"], seed
            assert got["scores"] == pytest.approx(want["scores"]), seed
        else:
            assert got == want, (seed, case)
        # predict reads the same texts, with the same reader
        assert read_table(path)["text"].to_pylist() == want["texts"], seed
        agreed += 1
    assert agreed > FILES_PER_FORMAT / 2 and refused > 0  # both paths taken
