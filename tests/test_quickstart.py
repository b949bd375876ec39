"""The README's quickstarts, run the way a user runs them: their commands exactly as written, in a
shell, from an empty folder, with the default MLflow store and every path relative. The GLUE
quickstart's only stand-in is the data: a tiny GLUE folder put where the README's placeholder
path points. The own-data quickstart writes its own files."""

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow

from sora_tune.quiet import QUIET_ENV
from tests.conftest import write_tiny_glue

README = Path(__file__).resolve().parents[1] / "README.md"
DATA_PLACEHOLDER = "path/to/glue"


def bash_blocks(heading: str) -> list[str]:
    """The bash blocks of the README's section `heading`, in order."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    section = text[start : text.index("\n## ", start + 1)]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)


def quickstart_commands() -> list[str]:
    """Every line of the quickstart's bash blocks, in order."""
    blocks = bash_blocks("## Quickstart")
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def user_env() -> dict[str, str]:
    """The console script of the environment running the tests, as `pip install` put it there,
    and none of the settings CI uses to quiet the libraries: the user has none."""
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return env


def test_the_quickstart_is_search_pareto_register_predict():
    tools = [c.split()[1] for c in quickstart_commands() if c.startswith("sora-tune ")]
    assert tools == ["search", "pareto", "register", "predict"]
    assert DATA_PLACEHOLDER in quickstart_commands()[0]


def test_the_quickstart_runs_as_written(tmp_path):
    write_tiny_glue(tmp_path / DATA_PLACEHOLDER)
    env = user_env()
    printed, chatter = {}, {}
    for command in quickstart_commands():
        done = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        name = command.split()[1] if command.startswith("sora-tune ") else command
        printed[name], chatter[name] = done.stdout, done.stderr

    # Every trial wrote to the store in the user's folder, not to one of its own.
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("sora-sst2")
    runs = client.search_runs([experiment.experiment_id])
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.info.status for r in trials) == ["FINISHED"] * 4
    assert (tmp_path / "optuna.db").exists()
    assert list(tmp_path.rglob("mlflow.db")) == [tmp_path / "mlflow.db"]

    assert "front (val_score up, retained_params down" in printed["search"]
    assert "sora-tune register --experiment sora-sst2" in printed["search"]
    assert "front" in printed["pareto"]
    assert "models:/sora-sst2@champion" in printed["register"]
    rows = printed["predict"].strip().splitlines()
    assert rows[0].startswith("label,probability")
    assert len(rows) == 3
    # The read commands print their product: no load reports, progress bars, warnings or logs.
    for name in ("pareto", "register", "predict"):
        for noise in ("LOAD REPORT", "Downloading artifacts", "Warning", " INFO "):
            assert noise not in chatter[name], f"{name}:\n{chatter[name]}"


def test_the_own_data_quickstart_runs_as_written(tmp_path):
    """Each bash block in one shell (the first writes the files with a here-document): a CSV of
    user-named pair columns with string labels and a JSON Lines test file, default flags."""
    printed = []
    for block in bash_blocks("## Quickstart: your own data"):
        done = subprocess.run(
            ["bash", "-c", block], cwd=tmp_path, env=user_env(), capture_output=True, text=True
        )
        assert done.returncode == 0, f"{block}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        printed.append(done.stdout)
    _, search, register, predict = printed
    assert "MLflow experiment 'sora-support'" in search
    assert "front (val_score up, retained_params down" in search
    assert "models:/sora-support@champion" in register
    rows = predict.strip().splitlines()
    assert rows[0] == "label,probability,prob_answered,prob_unanswered"
    assert len(rows) == 3 and all(
        row.split(",")[0] in {"answered", "unanswered"} for row in rows[1:]
    )

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sora-support")
    trials = [
        run
        for run in client.search_runs([experiment.experiment_id])
        if "mlflow.parentRunId" in run.data.tags
    ]
    assert sorted(r.info.status for r in trials) == ["FINISHED"] * 4
    for run in trials:
        assert {i.dataset.name for i in run.inputs.dataset_inputs} == {
            "support.csv",
            "support-test.jsonl",
        }
