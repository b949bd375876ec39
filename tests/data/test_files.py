"""The user's own data: files by extension, a save_to_disk folder, problem types, label names,
splits and every refusal of bad input (one line naming the file and the column or row)."""

import json

import pandas as pd
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Value

from sora_tune.data import DataLocation, data_sources, load_own_data, make_splits

PAIRS = [
    ("How do I reset my password?", "Click 'Forgot password' on the login page.", "answered"),
    ("Where is my parcel?", "I am sorry, I cannot say.", "unanswered"),
    ("Can I pay by card?", "Yes, every major card.", "answered"),
    ("Why was I charged twice?", "Please ask someone else.", "unanswered"),
] * 5
COLUMNS = ["question", "reply", "outcome"]


def write(path, rows=PAIRS, columns=COLUMNS):
    frame = pd.DataFrame(rows, columns=columns)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    return str(path)


def own(train, validation_file=None, test_file=None, **settings):
    return load_own_data(
        DataLocation(train_file=train, validation_file=validation_file, test_file=test_file),
        **({"text_columns": ("question", "reply"), "label_column": "outcome"} | settings),
    )


@pytest.mark.parametrize("extension", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_every_format_reads_to_the_same_pairs_and_string_labels(tmp_path, extension):
    data = own(write(tmp_path / f"rows{extension}"))
    train = data.raw["train"]
    assert train.column_names == ["question", "reply", "label"]
    assert train.features["label"] == ClassLabel(names=["answered", "unanswered"])
    assert train["label"][:2] == [0, 1]
    assert data.task.text_fields == ("question", "reply")
    assert data.task.label_names == ("answered", "unanswered")
    assert data.task.metrics == ("accuracy", "macro_f1", "matthews")
    assert data.task.primary == "accuracy"
    assert data.task.name == "rows"
    (source,) = data.sources
    assert source.split == "train" and source.source == str(tmp_path / f"rows{extension}")


def test_integer_labels_are_classes_named_by_their_sorted_values(tmp_path):
    rows = [(q, r, [10, 2, 7][i % 3]) for i, (q, r, _) in enumerate(PAIRS)]
    data = own(write(tmp_path / "ints.csv", rows))
    assert data.task.label_names == ("2", "7", "10")  # numeric order, not text order
    assert data.raw["train"]["label"][:3] == [2, 0, 1]


def test_float_labels_are_regression_scored_by_pearson(tmp_path):
    rows = [(q, r, i / 10) for i, (q, r, _) in enumerate(PAIRS)]
    data = own(write(tmp_path / "scores.parquet", rows))
    assert data.task.label_names is None
    assert data.task.primary == "pearson"
    assert data.raw["train"].features["label"] == Value("float32")


def test_problem_type_and_metric_override(tmp_path):
    rows = [(q, r, i % 3) for i, (q, r, _) in enumerate(PAIRS)]
    data = own(write(tmp_path / "ints.csv", rows), problem_type="regression", metric="spearman")
    assert data.task.label_names is None and data.task.primary == "spearman"
    with pytest.raises(ValueError, match="metric 'pearson' does not score classification"):
        own(write(tmp_path / "rows.csv"), metric="pearson")


def test_validation_and_test_files_keep_the_training_label_ids(tmp_path):
    train = write(tmp_path / "train.csv")
    test = write(tmp_path / "test.jsonl", PAIRS[1:3])
    data = own(train, test_file=test)
    assert list(data.raw) == ["train", "test"]
    assert data.raw["test"]["label"] == [1, 0]
    splits = make_splits(data.raw, data.task, val_size=4, seed=0)
    assert {name: len(split) for name, split in splits.items()} == {
        "train": 16,
        "val": 4,
        "test": 2,
    }
    assert sorted(splits["val"]["label"]) == [0, 0, 1, 1]  # stratified


def test_without_a_test_file_there_is_no_test_split(tmp_path):
    data = own(write(tmp_path / "train.csv"), validation_file=write(tmp_path / "val.tsv"))
    splits = make_splits(data.raw, data.task, seed=0)
    assert list(splits) == ["train", "val"]
    assert len(splits["train"]) == len(PAIRS)  # no hold-out when validation is given


def test_a_save_to_disk_folder_keeps_its_class_names(tmp_path):
    frame = pd.DataFrame(PAIRS, columns=COLUMNS).assign(outcome=[i % 2 for i in range(20)])
    split = Dataset.from_pandas(frame).cast_column("outcome", ClassLabel(names=["no", "yes"]))
    DatasetDict({"train": split, "test": split.select(range(4))}).save_to_disk(tmp_path / "saved")
    data = load_own_data(
        DataLocation(dataset=str(tmp_path / "saved"), test_split="test"),
        text_columns=("question",),
        label_column="outcome",
    )
    assert data.task.label_names == ("no", "yes")
    assert data.task.name == "saved"
    assert [s.split for s in data.sources] == ["train", "test"]
    assert data.sources[0].source_type == "local" and data.sources[0].digest


def test_the_digest_follows_the_content(tmp_path):
    path = write(tmp_path / "rows.csv")
    (first,) = data_sources(DataLocation(train_file=path))
    assert own(path).sources[0].digest == first.digest
    write(tmp_path / "rows.csv", PAIRS[:-1])
    (second,) = data_sources(DataLocation(train_file=path))
    assert second.digest != first.digest


# --- refusals: one line, naming the file and the column or row -----------------------------


def test_missing_column_lists_the_file_columns(tmp_path):
    path = write(tmp_path / "rows.csv")
    with pytest.raises(ValueError, match=r"rows.csv: no column 'answer'; it has question, reply"):
        own(path, text_columns=("question", "answer"))


def test_empty_file_and_header_only(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv: the file is empty"):
        own(str(tmp_path / "empty.csv"))
    (tmp_path / "header.csv").write_text("question,reply,outcome\n")
    with pytest.raises(ValueError, match=r"header.csv: the file is empty \(no rows\)"):
        own(str(tmp_path / "header.csv"))


def test_empty_text_cells_count_and_first_row(tmp_path):
    rows = list(PAIRS)
    rows[2] = (rows[2][0], "  ", rows[2][2])
    rows[5] = (rows[5][0], None, rows[5][2])
    with pytest.raises(
        ValueError,
        match=r"gaps.jsonl: column 'reply' has 2 empty or missing text cell\(s\), the first in "
        "row 3",
    ):
        own(write(tmp_path / "gaps.jsonl", rows))


def test_single_class_label_column(tmp_path):
    rows = [(q, r, "answered") for q, r, _ in PAIRS]
    with pytest.raises(ValueError, match="one.csv: label column 'outcome' has a single class"):
        own(write(tmp_path / "one.csv", rows))


def test_list_labels_are_refused_as_multi_label(tmp_path):
    path = tmp_path / "multi.jsonl"
    path.write_text(
        "\n".join(json.dumps({"question": q, "reply": r, "outcome": [o]}) for q, r, o in PAIRS)
    )
    with pytest.raises(ValueError, match=r"multi.jsonl: label column 'outcome' holds lists"):
        own(str(path))


def test_a_label_unseen_in_training_names_label_and_file(tmp_path):
    test = write(tmp_path / "test.csv", [("Is it open?", "Yes.", "maybe")])
    with pytest.raises(ValueError, match=r"test.csv: label 'maybe' \(row 1\) is not among"):
        own(write(tmp_path / "train.csv"), test_file=test)


def test_missing_labels_count_and_first_row(tmp_path):
    rows = list(PAIRS)
    rows[3] = (rows[3][0], rows[3][1], None)
    with pytest.raises(
        ValueError, match=r"label column 'outcome' has 1 missing cell\(s\), the first in row 4"
    ):
        own(write(tmp_path / "gaps.parquet", rows))


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(
        "question,reply,outcome\nok,fine,answered\nCafé?,oui,unanswered\n".encode("latin-1")
    )
    with pytest.raises(ValueError, match=r"latin1.csv: not valid UTF-8 \(line 3\)"):
        own(str(path))


@pytest.mark.parametrize(
    "name, message", [("rows.txt", "unknown extension '.txt'"), ("none.csv", "no such file")]
)
def test_unknown_extension_or_missing_file(tmp_path, name, message):
    (tmp_path / "rows.txt").write_text("question,reply,outcome\n")
    with pytest.raises(ValueError, match=f"train_file .*{name}: {message}"):
        own(str(tmp_path / name))


def test_a_location_names_files_or_a_dataset():
    with pytest.raises(ValueError, match="give files or a dataset, not both"):
        DataLocation(train_file="rows.csv", dataset="owner/name")
    with pytest.raises(ValueError, match="give a training file or a dataset"):
        DataLocation(test_file="rows.csv")
