"""Own data read as written, labels named and matched one way: a test for each way main read a
user's data wrongly or refused good data (issue "Own data you can trust", items 1-11; item 12,
the rows read, is checked where a search prints and logs them, tests/tune/test_own_data.py)."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import ClassLabel, Dataset, DatasetDict

from sora_tune.config import TrialConfig
from sora_tune.data import (
    DataLocation,
    compute_metrics,
    load_own_data,
    make_splits,
    own_task,
    pair_separator,
    read_table,
)
from sora_tune.train import prepare_data
from tests.conftest import word_tokenizer

TEXTS = ["Is it raining?", "Where is my parcel?", "Can I pay by card?", "Why so late?"] * 3


def own(train, **settings):
    location = {k: settings.pop(k) for k in ("test_file", "validation_file") if k in settings}
    return load_own_data(DataLocation(train_file=str(train), **location), **settings)


def test_a_class_label_column_named_label_is_read(tmp_path):
    """Item 1: the default label column, as nearly every Hub classification dataset has it."""
    split = Dataset.from_dict({"text": TEXTS, "label": [0, 1] * 6})
    split = split.cast_column("label", ClassLabel(names=["neg", "pos"]))
    DatasetDict({"train": split}).save_to_disk(tmp_path / "hub")
    data = load_own_data(DataLocation(dataset=str(tmp_path / "hub")))
    assert data.task.label_names == ("neg", "pos")
    assert data.raw["train"]["label"] == [0, 1] * 6


def test_the_cache_tells_two_label_columns_of_one_file_apart(tmp_path):
    """Item 2: the second label column must not reuse the first one's tokenised labels."""
    frame = pd.DataFrame({"text": TEXTS, "is_spam": [0, 1] * 6, "is_urgent": [1, 1, 0, 0] * 3})
    frame.to_csv(tmp_path / "mail.csv", index=False)
    labels = {}
    for column in ("is_spam", "is_urgent"):
        config = TrialConfig(
            train_file=str(tmp_path / "mail.csv"),
            label_column=column,
            val_size=4,
            cache_dir=str(tmp_path / "cache"),
        )
        data = prepare_data(config)
        labels[column] = sorted(
            zip(data["train"]["input_ids"], data["train"]["labels"], strict=True)
        )
    assert labels["is_spam"] != labels["is_urgent"]


def test_a_tsv_quote_is_text_and_every_line_a_row(tmp_path):
    """Item 3: an unbalanced quote glued lines into one cell; predict read the file otherwise."""
    lines = ['"He said hi', "A plain line", '"She said bye', 'He said "hi', "y", "z"]
    path = tmp_path / "quotes.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(lines)))
    data = own(path, text_columns=("sentence",))
    assert data.raw["train"]["sentence"] == lines
    assert data.raw["train"]["label"] == [0, 1] * 3
    assert read_table(path)["sentence"].to_pylist() == lines  # what predict reads


def test_a_tsv_line_with_another_field_count_is_refused(tmp_path):
    path = tmp_path / "tabs.tsv"
    path.write_text("sentence\tlabel\nfine\t0\ntab\tinside\t1\n")
    with pytest.raises(
        ValueError, match=r"tabs.tsv: line 3 \(row 2\) has 3 field\(s\), the header 2"
    ):
        own(path, text_columns=("sentence",))


@pytest.mark.parametrize(
    "train, test",
    [("True\nFalse", "true\nfalse"), ("true\nfalse", "True\nFalse")],
    ids=["csv-train-json-test", "json-train-csv-test"],
)
def test_boolean_labels_are_classes_matched_across_formats(tmp_path, train, test):
    """Item 4: booleans were named by str() and matched through Arrow's cast."""

    def write(name, spelled):
        values = spelled.split("\n") * 6
        if name.endswith(".csv"):
            pd.DataFrame({"text": TEXTS, "label": values}).to_csv(tmp_path / name, index=False)
        else:
            rows = [{"text": t, "label": v == "true"} for t, v in zip(TEXTS, values, strict=True)]
            (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return tmp_path / name

    train_name, test_name = ("a.csv", "b.jsonl") if train[0] == "T" else ("a.jsonl", "b.csv")
    data = own(write(train_name, train), test_file=str(write(test_name, test)))
    assert data.task.label_names == ("False", "True")
    assert data.raw["train"]["label"][:2] == [1, 0]
    assert data.raw["test"]["label"][:2] == [1, 0]


def test_float_labels_taken_as_classes(tmp_path):
    """Item 4: floats with single_label_classification, matched with integer test labels."""
    pq.write_table(pa.table({"text": TEXTS, "label": [0.0, 1.0, 0.5] * 4}), tmp_path / "f.parquet")
    pq.write_table(pa.table({"text": TEXTS[:3], "label": [1, 0, 1]}), tmp_path / "t.parquet")
    data = own(
        tmp_path / "f.parquet",
        test_file=str(tmp_path / "t.parquet"),
        problem_type="single_label_classification",
    )
    assert data.task.label_names == ("0", "0.5", "1")
    assert data.raw["train"]["label"][:3] == [0, 2, 1]
    assert data.raw["test"]["label"] == [2, 0, 2]


def test_class_label_splits_are_matched_by_name(tmp_path):
    """Item 5: a validation split encoded on its own as ['a', 'c'] was read as ['a', 'b']."""
    train = Dataset.from_dict({"text": TEXTS, "label": [0, 1, 2] * 4})
    train = train.cast_column("label", ClassLabel(names=["a", "b", "c"]))
    validation = Dataset.from_dict({"text": TEXTS[:4], "label": [0, 1, 1, 0]})
    validation = validation.cast_column("label", ClassLabel(names=["a", "c"]))
    DatasetDict({"train": train, "dev": validation}).save_to_disk(tmp_path / "hub")
    data = load_own_data(DataLocation(dataset=str(tmp_path / "hub"), validation_split="dev"))
    names = data.task.label_names
    assert [names[i] for i in data.raw["validation"]["label"]] == ["a", "c", "c", "a"]


def test_na_and_none_are_text_and_classes_in_training_and_predict(tmp_path):
    """Item 6: training read "None" and "NA" as missing, predict as text."""
    texts = ["None", "NA", "null", "nan"] * 3
    path = tmp_path / "words.csv"
    pd.DataFrame({"text": texts, "label": ["NA", "None"] * 6}).to_csv(path, index=False)
    data = own(path)
    assert data.raw["train"]["text"] == texts
    assert data.task.label_names == ("NA", "None")
    assert read_table(path)["text"].to_pylist() == texts  # what predict reads


def test_nan_regression_labels_are_refused_like_missing_ones(tmp_path):
    """Item 6: NaN scores in Parquet passed every check."""
    scores = [0.5, float("nan"), 1.5] * 4
    pq.write_table(pa.table({"text": TEXTS, "label": scores}), tmp_path / "s.parquet")
    with pytest.raises(
        ValueError,
        match=r"s.parquet: label column 'label' has 4 missing cell\(s\), the first in row 2",
    ):
        own(tmp_path / "s.parquet")


def test_one_class_spelled_with_and_without_a_space_is_refused(tmp_path):
    """Item 7: "pos" and "pos " became two classes."""
    path = tmp_path / "spaces.csv"
    pd.DataFrame({"text": TEXTS, "label": ["pos", "neg", "pos "] * 4}).to_csv(path, index=False)
    with pytest.raises(
        ValueError, match=r"spells one class two ways, 'pos' and 'pos ' \(row 3\): remove the"
    ):
        own(path)


def test_a_test_label_with_a_space_names_the_training_spelling(tmp_path):
    pd.DataFrame({"text": TEXTS, "label": ["pos", "neg"] * 6}).to_csv(
        tmp_path / "a.csv", index=False
    )
    pd.DataFrame({"text": TEXTS[:2], "label": ["neg", " pos"]}).to_csv(
        tmp_path / "b.csv", index=False
    )
    with pytest.raises(ValueError, match=r"label ' pos' \(row 2\).*spell it 'pos'"):
        own(tmp_path / "a.csv", test_file=str(tmp_path / "b.csv"))


def test_numbers_mixed_with_text_are_refused_unless_classes_are_asked_for(tmp_path):
    path = tmp_path / "scores.csv"
    pd.DataFrame({"text": TEXTS, "label": ["0.5", "1.5", "NA"] * 4}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"holds numbers and text \('NA' in row 3\)"):
        own(path)
    data = own(path, problem_type="single_label_classification")
    assert data.task.label_names == ("0.5", "1.5", "NA")


def test_a_pair_on_a_tokenizer_without_a_pair_template_is_joined_by_its_eos(tokenizer):
    """Item 8: GPT-2-like tokenizers ran the two texts together."""
    words = word_tokenizer()
    assert pair_separator(words) == "</s>"
    assert pair_separator(words, " || ") == " || "
    ids = words("red blue" + pair_separator(words) + "happy sad")["input_ids"]
    assert words.eos_token_id in ids[1:-1]
    assert pair_separator(tokenizer) is None  # BERT's template puts [SEP] between


def test_macro_f1_averages_every_class():
    """Item 9: a class no scored row has, and none predicted, still counts (its F1 is 0)."""
    task = own_task("three", ("text",), ("a", "b", "c"), "macro_f1")
    scores = compute_metrics(task, np.array([0, 1, 0, 1]), np.array([0, 1, 0, 1]))
    assert scores["macro_f1"] == pytest.approx(2 / 3)


def test_a_class_of_one_row_stays_in_training_and_the_rest_is_stratified():
    """Item 10: a single-row class made the hold-out an unstratified draw, and could land it in
    validation only."""
    labels = [0] * 10 + [1] * 10 + [2]
    raw = DatasetDict({"train": Dataset.from_dict({"text": ["t"] * 21, "label": labels})})
    task = own_task("rare", ("text",), ("a", "b", "c"))
    for seed in range(5):
        splits = make_splits(raw, task, val_size=4, seed=seed)
        assert 2 in splits["train"]["label"]
        assert sorted(splits["val"]["label"]) == [0, 0, 1, 1]


@pytest.mark.parametrize("setting", [{"label_column": "outcome"}, {"train_split": "dev"}])
def test_own_data_settings_with_a_glue_task_are_refused(setting):
    """Item 11: these were silently ignored, while text_columns was refused."""
    (name,) = setting
    with pytest.raises(ValueError, match=f"{name} describe your own data"):
        TrialConfig(task="mrpc", **setting)
