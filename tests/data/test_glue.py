import socket
import time
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Value

from sora_tune.data import GlueDataUnavailableError, glue_sources, load_glue, make_splits
from sora_tune.data import glue as glue_module

SHARED_GLUE = Path(__file__).parents[2].parent / "shared" / "data" / "glue"
BOM = "\ufeff".encode()
SST2_HEADER = "sentence\tlabel\n"
MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
PAIR_HEADER = "index\tsentence1\tsentence2\tlabel\n"
STSB_HEADER = (
    "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
)
MNLI_HEADER = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"


def _stsb_row(i: int, a: str, b: str, score: str) -> str:
    return f"{i}\tmain-news\tf\t2012\t{i:04d}\tnone\tnone\t{a}\t{b}\t{score}\n"


@pytest.fixture(autouse=True)
def _no_data_dir_from_env(monkeypatch):
    monkeypatch.delenv(glue_module.DATA_DIR_ENV, raising=False)


# --- TSV quirks -----------------------------------------------------------------------------


def test_sst2_unbalanced_quotes_are_text(write_task, glue_dir):
    # With csv quoting on, the first '"' would swallow the following lines into one field.
    write_task(
        "SST-2",
        train=SST2_HEADER + 'it \'s " a charming journey \t1\nbleak \t0\n" and desperate\t0\n',
        dev=SST2_HEADER + '"\t1\n',
    )
    raw = load_glue("sst2", glue_dir)
    assert raw["train"]["sentence"] == ["it 's \" a charming journey ", "bleak ", '" and desperate']
    assert raw["train"]["label"] == [1, 0, 0]
    assert raw["dev"]["sentence"] == ['"']
    assert raw["train"].features["sentence"] == Value("string")
    assert raw["train"].features["label"] == ClassLabel(names=["negative", "positive"])


def test_mrpc_bom_header_and_quotes(write_task, glue_dir):
    rows = (
        '1\t1355540\t1355592\tHe said the pie " business .\t" The pie business .\n'
        "0\t2029631\t2029565\tMagnarelli said .\tHis wife said .\n"
    )
    write_task("MRPC", train=BOM + (MRPC_HEADER + rows).encode(), dev=BOM + MRPC_HEADER.encode())
    raw = load_glue("mrpc", glue_dir)
    assert raw["train"].column_names == ["sentence1", "sentence2", "label"]
    assert raw["train"]["sentence1"] == ['He said the pie " business .', "Magnarelli said ."]
    assert raw["train"]["sentence2"] == ['" The pie business .', "His wife said ."]
    assert raw["train"]["label"] == [1, 0]
    assert len(raw["dev"]) == 0


def test_cola_headerless_last_line_without_newline(write_task, glue_dir):
    write_task(
        "CoLA",
        train='gj04\t1\t\tThe sailors rode the breeze.\nl-93\t0\t*\tSusan whispered "Shut up.\n',
        dev="gj04\t1\t\tFirst.\ngj04\t0\t*\tLast, no newline.",
    )
    raw = load_glue("cola", glue_dir)
    assert raw["train"]["sentence"] == ["The sailors rode the breeze.", 'Susan whispered "Shut up.']
    assert raw["dev"]["sentence"] == ["First.", "Last, no newline."]
    assert raw["dev"]["label"] == [1, 0]


def test_blank_text_and_trailing_blank_line_are_fine(write_task, glue_dir):
    write_task("SST-2", train=SST2_HEADER + "\t1\nfine\t0\n\n", dev=SST2_HEADER)
    assert load_glue("sst2", glue_dir)["train"]["sentence"] == ["", "fine"]


@pytest.mark.parametrize(
    ("task", "folder", "labels"),
    [
        ("rte", "RTE", ["entailment", "not_entailment"]),
        ("qnli", "QNLI", ["not_entailment", "entailment"]),
        ("wnli", "WNLI", ["0", "1"]),
    ],
)
def test_string_and_numeric_labels(write_task, glue_dir, task, folder, labels):
    header = "index\tquestion\tsentence\tlabel\n" if task == "qnli" else PAIR_HEADER
    rows = "".join(f"{i}\ta{i}\tb{i}\t{label}\n" for i, label in enumerate(labels))
    write_task(folder, train=header + rows, dev=header)
    raw = load_glue(task, glue_dir)
    names = raw["train"].features["label"].names
    assert [names[i] for i in raw["train"]["label"]] == (
        ["not_entailment", "entailment"] if task == "wnli" else labels
    )


def test_mnli_matched_and_mismatched_share_train(write_task, glue_dir):
    row = "0\t1\t1\tfiction\t{a}\t{b}\tneutral\t{label}\n"
    write_task(
        "MNLI",
        train=MNLI_HEADER + row.format(a="p", b="h", label="contradiction"),
        dev_matched=MNLI_HEADER + row.format(a="pm", b="hm", label="entailment"),
        dev_mismatched=MNLI_HEADER + row.format(a="pmm", b="hmm", label="neutral"),
    )
    matched, mismatched = load_glue("mnli", glue_dir), load_glue("mnli-mm", glue_dir)
    assert matched["train"].column_names == ["premise", "hypothesis", "label"]
    assert matched["train"][0] == mismatched["train"][0] == {
        "premise": "p", "hypothesis": "h", "label": 2
    }  # fmt: skip
    assert matched["dev"]["premise"] == ["pm"] and matched["dev"]["label"] == [0]
    assert mismatched["dev"]["premise"] == ["pmm"] and mismatched["dev"]["label"] == [1]


def test_stsb_scores_and_qqp_columns(write_task, glue_dir):
    write_task(
        "STS-B",
        train=STSB_HEADER + _stsb_row(0, "A plane.", "An air plane.", "5.000"),
        dev=STSB_HEADER + _stsb_row(1, "A man.", "A flute.", "0.5"),
    )
    qqp_header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    write_task("QQP", train=qqp_header + "0\t1\t2\tWhy?\tHow?\t1\n", dev=qqp_header)
    stsb = load_glue("stsb", glue_dir)
    assert stsb["train"].features["label"] == Value("float32")
    assert stsb["train"][0] == {"sentence1": "A plane.", "sentence2": "An air plane.", "label": 5.0}
    assert stsb["dev"]["label"] == [0.5]
    qqp = load_glue("qqp", glue_dir)
    assert qqp["train"][0] == {"question1": "Why?", "question2": "How?", "label": 1}


def test_data_dir_from_environment(write_task, glue_dir, monkeypatch):
    write_task("SST-2", train=SST2_HEADER + "ok\t1\n", dev=SST2_HEADER)
    monkeypatch.setenv(glue_module.DATA_DIR_ENV, str(glue_dir))
    assert load_glue("sst-2")["train"]["sentence"] == ["ok"]


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("folder", "task", "train", "match"),
    [
        (
            "SST-2",
            "sst2",
            SST2_HEADER + "good\t1\nno label field\n",
            r"train\.tsv, line 3: .*got 1",
        ),
        ("SST-2", "sst2", SST2_HEADER + "good\t1\nbad\t2\n", r"train\.tsv, line 3: label '2'"),
        ("RTE", "rte", PAIR_HEADER + "0\ta\tb\tneutral\n", r"train\.tsv, line 2: label 'neutral'"),
        (
            "STS-B",
            "stsb",
            STSB_HEADER + _stsb_row(0, "a", "b", "1.0") + _stsb_row(1, "a", "b", "n/a"),
            r"train\.tsv, line 3: label 'n/a' is not a number",
        ),
    ],
)
def test_malformed_row_names_file_and_line(write_task, glue_dir, folder, task, train, match):
    write_task(folder, train=train, dev=train)
    with pytest.raises(ValueError, match=match):
        load_glue(task, glue_dir)


def test_missing_column_names_file_and_column(write_task, glue_dir):
    write_task("RTE", train="index\tsentence1\tsentence_2\tlabel\n", dev=PAIR_HEADER)
    with pytest.raises(ValueError, match=r"RTE/train\.tsv: missing column\(s\) \['sentence2'\]"):
        load_glue("rte", glue_dir)


def test_missing_data_dir_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing} does not exist"):
        load_glue("mrpc", missing)


def test_missing_task_folder_names_the_path(write_task, glue_dir):
    write_task("SST-2", train=SST2_HEADER, dev=SST2_HEADER)
    with pytest.raises(FileNotFoundError, match=f"{glue_dir / 'MRPC'} does not exist"):
        load_glue("mrpc", glue_dir)


def test_missing_dev_file_names_the_path(write_task, glue_dir):
    write_task("MNLI", train=MNLI_HEADER, dev_matched=MNLI_HEADER)
    with pytest.raises(FileNotFoundError, match="dev_mismatched.tsv"):
        load_glue("mnli-mm", glue_dir)


def test_environment_folder_is_never_replaced_by_the_hub(tmp_path, monkeypatch):
    monkeypatch.setenv(glue_module.DATA_DIR_ENV, str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match="gone does not exist"):
        load_glue("mrpc")


def _clear_hub_environment(monkeypatch):
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_without_data_fails_fast_with_advice(monkeypatch, variable):
    _clear_hub_environment(monkeypatch)
    monkeypatch.setenv(variable, "1")
    start = time.perf_counter()
    with pytest.raises(
        GlueDataUnavailableError, match=rf"{variable} is set.*--data-dir.*SORA_TUNE"
    ):
        load_glue("mrpc")
    assert time.perf_counter() - start < 1.0


def test_unreachable_endpoint_fails_fast(monkeypatch):
    _clear_hub_environment(monkeypatch)
    with socket.socket() as probe:  # a local port that nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(GlueDataUnavailableError, match=f"127.0.0.1:{port}"):
        load_glue("sst2")


def test_hanging_name_lookup_is_cut_off(monkeypatch):
    _clear_hub_environment(monkeypatch)
    monkeypatch.setattr(glue_module, "HUB_PROBE_TIMEOUT", 0.2)

    def hanging_lookup(*args, **kwargs):
        time.sleep(5)
        raise socket.gaierror("name lookup timed out")  # how a lookup that hangs ends

    monkeypatch.setattr(socket, "create_connection", hanging_lookup)
    start = time.perf_counter()
    with pytest.raises(GlueDataUnavailableError, match="within 0.2 s"):
        load_glue("sst2")
    assert time.perf_counter() - start < 1.0


def test_sources_name_the_files_read_with_their_digests(write_task, glue_dir, monkeypatch):
    row = "0\t1\t1\tfiction\tp\th\tneutral\t{label}\n"
    write_task(
        "MNLI",
        train=MNLI_HEADER + row.format(label="contradiction"),
        dev_matched=MNLI_HEADER + row.format(label="entailment"),
        dev_mismatched=MNLI_HEADER + row.format(label="neutral"),
    )
    monkeypatch.chdir(glue_dir.parent)  # a relative folder, as a user gives it
    train, test = glue_sources("mnli-mm", "glue")
    assert (train.split, train.name, test.split, test.name) == (
        "train", "MNLI/train.tsv", "test", "MNLI/dev_mismatched.tsv"
    )  # fmt: skip
    assert test.source == str(glue_dir / "MNLI" / "dev_mismatched.tsv")
    assert test.source_type == "local" and len(test.digest) == 16
    assert glue_sources("mnli", glue_dir)[0] == train  # matched and mismatched share train
    assert glue_sources("mnli", glue_dir)[1].digest != test.digest
    write_task("MNLI", dev_mismatched=MNLI_HEADER + row.format(label="entailment"))
    assert glue_sources("mnli-mm", glue_dir)[1].digest != test.digest  # it follows the content


def test_hub_data_are_mapped_to_the_tsv_columns(monkeypatch):
    hub_label = ClassLabel(names=["entailment", "neutral", "contradiction"])

    def split(premise: str, label: int) -> Dataset:
        data = {"premise": [premise], "hypothesis": ["h"], "label": [label], "idx": [0]}
        return Dataset.from_dict(data).cast_column("label", hub_label)

    calls = []

    def fake_load_dataset(path, name):
        calls.append((path, name))
        return DatasetDict(
            train=split("train", 0),
            validation_matched=split("matched", 1),
            validation_mismatched=split("mismatched", 2),
        )

    monkeypatch.setattr(glue_module, "_hub_unreachable_reason", lambda: None)
    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    raw = load_glue("mnli-mm")
    assert calls == [("nyu-mll/glue", "mnli")]
    assert raw["train"].column_names == ["premise", "hypothesis", "label"]
    assert raw["dev"][0] == {"premise": "mismatched", "hypothesis": "h", "label": 2}


# --- the real GLUE copy ---------------------------------------------------------------------


@pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason=f"no GLUE copy at {SHARED_GLUE}")
@pytest.mark.parametrize(
    ("task", "n_train", "n_dev"),
    [("cola", 8551, 1043), ("sst2", 67349, 872), ("mrpc", 3668, 408), ("stsb", 5749, 1500)],
)
def test_shared_glue_copy_has_official_sizes(task, n_train, n_dev):
    raw = load_glue(task, SHARED_GLUE)
    assert (len(raw["train"]), len(raw["dev"])) == (n_train, n_dev)


# --- make_splits ----------------------------------------------------------------------------


def _raw(n_train: int = 200, n_dev: int = 50, regression: bool = False) -> DatasetDict:
    """Rows with unique texts; 30 % positives (classification) or scores in [0, 5]."""

    def rows(prefix: str, n: int) -> Dataset:
        labels = (
            np.linspace(0, 5, n).tolist() if regression else [int(i % 10 < 3) for i in range(n)]
        )
        texts = [f"{prefix}{i}" for i in range(n)]
        return Dataset.from_dict({"sentence1": texts, "sentence2": texts, "label": labels})

    return DatasetDict(train=rows("t", n_train), dev=rows("d", n_dev))


def test_splits_are_disjoint_and_cover_train():
    splits = make_splits(_raw(), "mrpc", val_size=0.2, seed=3)
    train, val = set(splits["train"]["sentence1"]), set(splits["val"]["sentence1"])
    assert (len(train), len(val)) == (160, 40)
    assert not train & val
    assert train | val == set(_raw()["train"]["sentence1"])
    assert splits["test"]["sentence1"] == _raw()["dev"]["sentence1"]


def test_splits_are_stratified():
    splits = make_splits(_raw(), "mrpc", val_size=40, seed=0)
    assert sum(splits["val"]["label"]) == 12  # 30 % of 40
    assert sum(splits["train"]["label"]) == 48  # 30 % of 160


def test_splits_are_deterministic_per_seed():
    def val(seed: int) -> list[str]:
        return make_splits(_raw(), "mrpc", seed=seed)["val"]["sentence1"]

    assert val(1) == val(1)
    assert val(1) != val(2)


def test_sample_limits_apply_after_the_hold_out():
    full = make_splits(_raw(), "mrpc", val_size=0.2, seed=5)
    small = make_splits(
        _raw(), "mrpc", val_size=0.2, seed=5, max_train_samples=30, max_eval_samples=10
    )
    assert [len(small[s]) for s in ("train", "val", "test")] == [30, 10, 10]
    for name in ("train", "val", "test"):
        assert set(small[name]["sentence1"]) <= set(full[name]["sentence1"])
    assert sum(small["train"]["label"]) == 9  # still 30 % positives
    # Limits above the split size keep everything.
    assert len(make_splits(_raw(), "mrpc", max_eval_samples=10_000)["test"]) == 50


def test_regression_splits_stratify_by_score_bins():
    splits = make_splits(_raw(regression=True), "stsb", val_size=50, seed=0)
    val_scores = np.asarray(splits["val"]["label"])
    counts = np.histogram(val_scores, bins=[0, 1, 2, 3, 4, 5.01])[0]
    assert len(val_scores) == 50 and counts.min() >= 8  # spread over the whole range


def test_tiny_data_fall_back_to_a_plain_draw():
    raw = DatasetDict(
        train=Dataset.from_dict({"sentence": list("abcde"), "label": [0, 0, 0, 0, 1]}),
        dev=Dataset.from_dict({"sentence": ["x"], "label": [1]}),
    )
    splits = make_splits(raw, "sst2", val_size=1, max_train_samples=2)
    assert (len(splits["train"]), len(splits["val"])) == (2, 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_size": 0}, "val_size"),
        ({"val_size": 1.0}, "val_size"),
        ({"val_size": 200}, "val_size=200 holds out 200 of 200"),
        ({"val_size": True}, "val_size"),
        ({"val_size": "0.1"}, "val_size"),
        ({"max_train_samples": 0}, "max_train_samples"),
        ({"max_eval_samples": 2.5}, "max_eval_samples"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_splits(_raw(), "mrpc", **kwargs)


def test_missing_train_split_is_named():
    with pytest.raises(ValueError, match="raw lacks the split 'train'"):
        make_splits(DatasetDict(dev=_raw()["dev"]), "mrpc")


def test_without_dev_or_test_there_is_no_test_split():
    assert list(make_splits(DatasetDict(train=_raw()["train"]), "mrpc")) == ["train", "val"]
