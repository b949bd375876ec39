"""Fault drill 5: every bad input of docs/errors.md, run through the CLI in-process.

The table in docs/errors.md is the specification: each row's case id has a command here, and the
command must exit with the row's code and print the row's message. A row without a case, or a
case without a row, fails the test, so the document and the code cannot drift apart.
"""

import re
import time
from pathlib import Path

import mlflow
import pytest
import ray
import yaml

from sora_tune.cli import main
from tests.conftest import free_port

ERRORS_DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
SECONDS = 20  # generous: every case fails in well under a second or two, before Ray starts


def documented_cases() -> dict[str, tuple[str, int]]:
    """`case id -> (message pattern, exit code)` from the table of docs/errors.md."""
    cases = {}
    for line in ERRORS_DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not re.fullmatch(r"`[a-z0-9-]+`", cells[0]):
            continue
        case, _, message, code, _ = cells
        cases[case.strip("`")] = (message.strip("`"), int(code))
    return cases


def pattern_regex(pattern: str) -> re.Pattern:
    """The documented pattern as a regular expression: `<...>` stands for any text, the rest is
    literal, and the message starts at the beginning of a line of stderr."""
    parts = re.split(r"<[^<>]+>", pattern.replace("…", "<…>"))
    return re.compile("^" + ".+?".join(re.escape(part) for part in parts), re.MULTILINE)


@pytest.fixture
def inputs(tiny_trial, tmp_path):
    """Files for the bad inputs, and a valid search space of tiny trials to spoil."""
    trial = {k: v for k, v in tiny_trial.items() if k not in ("data_dir", "model", "task")}

    def space(parameters: dict, name: str | None = None) -> str:
        path = tmp_path / (name or f"space-{len(list(tmp_path.glob('space-*')))}.yaml")
        path.write_text(yaml.safe_dump({"parameters": parameters}))
        return str(path)

    wrong_columns = tmp_path / "wrong-columns" / "MRPC"
    wrong_columns.mkdir(parents=True)
    for split in ("train", "dev"):
        (wrong_columns / f"{split}.tsv").write_text("label\tsentence\n1\tA sentence.\n")
    (tmp_path / "empty-folder").mkdir()
    rows = [("How do I pay?", "By card.", "answered"), ("Where is it?", "No idea.", "no")] * 4
    own_files = {
        "good.csv": rows,
        "gaps.csv": rows[:2] + [("Is it open?", "", "answered")] + rows[3:],
        "one.csv": [(q, r, "answered") for q, r, _ in rows],
        "test.csv": [("Is it open?", "Maybe.", "unsure")],
    }
    for name, content in own_files.items():
        lines = ["question,reply,outcome", *(",".join(row) for row in content)]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    (tmp_path / "rows.tsv").write_text("question\treply\toutcome\nq\tr\tanswered\nq\tr\tx\tno\n")
    (tmp_path / "open.csv").write_text('question,reply,outcome\n"How do I pay?,By card.,no\n')
    (tmp_path / "broken.jsonl").write_text(
        '{"question": "q", "reply": "r", "outcome": "no"}\n{"question": "q", "rep\n'
    )
    (tmp_path / "mixed.jsonl").write_text(
        '{"question": "q", "reply": "r", "outcome": "answered"}\n'
        '{"question": "q", "reply": "r", "outcome": 1}\n'
    )
    (tmp_path / "twice.csv").write_text("question,reply,question\nq,r,q\n")
    (tmp_path / "list.jsonl").write_text('["q", "r", "no"]\n')
    spaced = [(q, r, o if i else o + " ") for i, (q, r, o) in enumerate(rows)]
    for name, content in {
        "holes.csv": rows[:3] + [("Is it open?", "Yes.", "")],
        "spaced.csv": spaced,
        "scores.csv": [(q, r, ["0.5", "NA"][i % 2]) for i, (q, r, _) in enumerate(rows)],
    }.items():
        lines = ["question,reply," + ("score" if name == "scores.csv" else "outcome")]
        (tmp_path / name).write_text("\n".join([*lines, *(",".join(r) for r in content)]) + "\n")
    (tmp_path / "rows.txt").write_text("question,reply,outcome\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "latin1.csv").write_bytes(
        "question,reply,outcome\nCafé?,Oui.,no\n".encode("latin-1")
    )
    (tmp_path / "multi.jsonl").write_text(
        "".join(f'{{"question": "{q}", "reply": "{r}", "outcome": ["{o}"]}}\n' for q, r, o in rows)
    )

    # A GPT-2 whose q, k and v are one fused layer (with the packaged tokenizer: shapes only).
    from transformers import AutoTokenizer, GPT2Config, GPT2Model

    gpt2 = tmp_path / "tiny-gpt2"
    GPT2Model(GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=2)).save_pretrained(gpt2)
    AutoTokenizer.from_pretrained(tiny_trial["model"]).save_pretrained(gpt2)
    # A decoder whose tokenizer pads but has no pair template, no sep and no eos token.
    from tests.conftest import word_tokenizer

    bare = tmp_path / "bare-decoder"
    GPT2Model(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(bare)
    tokens = word_tokenizer()
    tokens.eos_token, tokens.pad_token = None, "<unk>"
    tokens.save_pretrained(bare)

    mlflow.MlflowClient(f"sqlite:///{tmp_path / 'other.db'}").create_experiment("sora-sst2")
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("parameters:\n  xi: {type: loguniform, low: 1.0e-5\n  r_max: 8\n")
    return {
        "data": ["--task", "mrpc", "--data-dir", tiny_trial["data_dir"]],
        "model": ["--model", tiny_trial["model"]],
        "space": space,
        "trial": trial,
        "malformed": str(malformed),
        "wrong_columns": str(wrong_columns.parent),
        "empty_folder": str(tmp_path / "empty-folder"),
        "gpt2": str(gpt2),
        "bare_decoder": str(bare),
    }


def commands(inputs: dict, tmp_path: Path) -> dict[str, list[str]]:
    """For every case: the sora-tune arguments that make it happen."""
    space, trial = inputs["space"], inputs["trial"]
    good = space(trial | {"xi": {"type": "loguniform", "low": 1e-5, "high": 1e-3}}, "good.yaml")
    search = ["search", "--config", good, *inputs["data"], *inputs["model"]]
    columns = ["--text-columns", "question,reply", "--label-column", "outcome"]
    own = ["search", "--config", good, *inputs["model"], *columns, "--train-file"]
    train = ["train", "--output-dir", str(tmp_path / "run")]
    return {
        "malformed-yaml": ["search", "--config", inputs["malformed"]],
        "config-not-found": ["search", "--config", str(tmp_path / "no-such-space.yaml")],
        "no-config": ["search", "--num-samples", "2"],
        "unknown-parameter": ["search", "--config", space(trial | {"learning_rate": 1e-3})],
        "unknown-distribution": [
            "search",
            "--config",
            space(trial | {"xi": {"type": "normal", "low": 1e-5, "high": 1e-3}}),
        ],
        "empty-choice": [
            "search",
            "--config",
            space(trial | {"r_max": {"type": "choice", "values": []}}),
        ],
        "r-max-zero": ["search", "--config", space(trial | {"r_max": 0})],
        "negative-lambda": ["search", "--config", space(trial | {"lam": -0.1})],
        "negative-xi": [
            "search",
            "--config",
            space(trial | {"xi": {"type": "uniform", "low": -1e-4, "high": 1e-3}}),
        ],
        "fractional-epochs": [
            "search",
            "--config",
            space(trial | {"epochs": {"type": "uniform", "low": 1, "high": 4}}),
        ],
        "bad-flag-value": [*search, "--r-max", "eight"],
        "unknown-sampler": [*search, "--sampler", "bayes"],
        "gpus-per-trial": [*search, "--gpus-per-trial", "2"],
        "workers-batch-size": [*search, "--workers-per-trial", "3"],
        "gpu-memory-value": ["estimate", *inputs["model"], "--gpu-memory", "24XB"],
        "gpus-auto-fits-none": [*search, "--gpus-per-trial", "auto", "--gpu-memory", "1GiB"],
        "cluster-local-store": [*search, "--address", "auto"],
        "ray-client-storage": [
            *search,
            "--address",
            "ray://head:10001",
            "--mlflow-uri",
            "http://mlflow:5000",
        ],
        "resume-with-flags": ["search", "--resume", "ray_results/s", "--num-samples", "16"],
        "unknown-task": [*train, "--task", "imdb"],
        "missing-data-folder": [
            *search,
            "--data-dir",
            str(tmp_path / "no-such-folder"),
        ],
        "missing-task-folder": [*search, "--data-dir", inputs["empty_folder"]],
        "tsv-wrong-columns": [*search, "--data-dir", inputs["wrong_columns"]],
        "no-data-offline": ["search", "--config", good, "--task", "mrpc", *inputs["model"]],
        "data-file-missing": [*own, "no-such.csv"],
        "data-file-extension": [*own, "rows.txt"],
        "data-file-empty": [*own, "empty.csv"],
        "data-column-missing": [*own, "good.csv", "--text-columns", "question,answer"],
        "data-text-empty": [*own, "gaps.csv"],
        "data-single-class": [*own, "one.csv"],
        "data-multi-label": [*own, "multi.jsonl"],
        "data-unseen-label": [*own, "good.csv", "--test-file", "test.csv"],
        "data-not-utf8": [*own, "latin1.csv"],
        "data-task-and-file": [*own, "good.csv", "--task", "rte"],
        "data-own-setting-with-glue": [*search, "--label-column", "outcome"],
        "data-row-fields": [*own, "rows.tsv"],
        "data-pair-no-separator": [
            *own,
            "good.csv",
            "--model",
            inputs["bare_decoder"],
            "--val-size",
            "2",
        ],
        "data-csv-quote": [*own, "open.csv"],
        "data-json-invalid": [*own, "broken.jsonl"],
        "data-json-mixed": [*own, "mixed.jsonl"],
        "data-json-not-object": [*own, "list.jsonl"],
        "data-header-repeated": [*own, "twice.csv"],
        "data-label-missing": [*own, "holes.csv"],
        "data-label-spaces": [*own, "spaced.csv"],
        "data-label-numbers-and-text": [
            *own[:-3],
            "--label-column",
            "score",
            "--train-file",
            "scores.csv",
        ],
        "missing-model-path": [*search, "--model", "./no-such-model"],
        "hub-model-offline": [*search, "--model", "no-such-owner/no-such-model"],
        "mlflow-unreachable": [*search, "--mlflow-uri", f"http://127.0.0.1:{free_port()}"],
        "password-in-uri": [
            *search,
            "--mlflow-uri",
            "https://alice:s3cr3t-value@mlflow.example.com",
        ],
        "database-driver-missing": [
            *search,
            "--mlflow-uri",
            "mysql://alice@127.0.0.1/mlflow",
        ],
        "not-a-search-folder": ["search", "--resume", inputs["empty_folder"]],
        "store-not-found": ["pareto", "--experiment", "sora-mrpc"],
        "experiment-not-found": [
            "pareto",
            "--experiment",
            "sora-mrpc",
            "--mlflow-uri",
            "sqlite:///other.db",
        ],
        "model-cannot-load": [*search, "--model", inputs["empty_folder"]],
        "targets-match-nothing": [*search, "--target-modules", "query_proj,value_proj"],
        "targets-fused-qk": [*search, "--model", inputs["gpt2"], "--target-modules", "qk"],
        "registered-model-name": [
            "register",
            "--experiment",
            "sora-mrpc",
            "--name",
            "sora/mrpc",
            "--mlflow-uri",
            "sqlite:///other.db",
        ],
        "predict-input-missing": [
            "predict",
            "--model",
            "models:/sora-mrpc@champion",
            "--input",
            str(tmp_path / "no-such-rows.csv"),
        ],
    }


def test_every_documented_case_has_a_command_and_back(inputs, tmp_path):
    documented, coded = set(documented_cases()), set(commands(inputs, tmp_path))
    assert documented, f"no case table found in {ERRORS_DOC}"
    assert documented - coded == set(), "rows of docs/errors.md without a test case"
    assert coded - documented == set(), "test cases without a row in docs/errors.md"


@pytest.mark.parametrize("case", sorted(documented_cases()))
def test_bad_input_fails_fast_with_its_message(case, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SORA_TUNE_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_ray(*args, **kwargs):
        raise AssertionError("a bad input must be refused before Ray starts")

    monkeypatch.setattr(ray, "init", no_ray)
    pattern, code = documented_cases()[case]
    argv = commands(inputs, tmp_path)[case]
    start = time.monotonic()
    try:
        exit_code = main(argv)
    except SystemExit as stop:  # argparse refuses a flag value by exiting
        exit_code = stop.code
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert exit_code == code, err
    assert pattern_regex(pattern).search(err), f"{pattern!r} not in:\n{err}"
    assert "s3cr3t-value" not in err
    assert elapsed < SECONDS
    # Nothing expensive started: no Ray, no experiment folder.
    assert not ray.is_initialized()
    assert not (tmp_path / "ray_results").exists()


@pytest.mark.parametrize(
    "model, offline, accepted",
    [
        ("{folder}", True, True),  # an existing folder, whatever the Hub
        ("owner/name", False, True),  # a Hub id with the Hub on: transformers may download it
        ("name", False, True),
        ("cached-owner/cached-name", True, True),  # in the local cache
        ("owner/name", True, False),  # offline and not cached
        ("./no-such-model", False, False),  # a path, not an id
        ("../models/no-such-model", False, False),
        ("runs/a/b", False, False),
        ("/abs/no-such-model", False, False),
    ],
)
def test_check_model(model, offline, accepted, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from sora_tune.config import check_model

    # A Hub cache holding cached-owner/cached-name, as huggingface_hub lays it out.
    cache = tmp_path / "hub"
    snapshot = cache / "models--cached-owner--cached-name" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--cached-owner--cached-name" / "refs").mkdir()
    (cache / "models--cached-owner--cached-name" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")

    model = model.format(folder=tmp_path)
    if accepted:
        check_model(model)
    else:
        with pytest.raises(ValueError, match=re.escape(repr(model))):
            check_model(model)
