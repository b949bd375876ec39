"""The README's quickstart, run the way a user runs it: its commands exactly as written, each in a
shell, from an empty folder, with the default MLflow store and every path relative. The only
stand-in is the data: a tiny GLUE folder put where the README's placeholder path points."""

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


def quickstart_commands() -> list[str]:
    """Every line of the quickstart's bash blocks, in order."""
    text = README.read_text()
    start = text.index("## Quickstart")
    section = text[start : text.index("\n## ", start + 1)]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_the_quickstart_is_search_pareto_register_predict():
    tools = [c.split()[1] for c in quickstart_commands() if c.startswith("sora-tune ")]
    assert tools == ["search", "pareto", "register", "predict"]
    assert DATA_PLACEHOLDER in quickstart_commands()[0]


def test_the_quickstart_runs_as_written(tmp_path):
    write_tiny_glue(tmp_path / DATA_PLACEHOLDER)
    # The console script of the environment running the tests, as `pip install` put it there,
    # and none of the settings CI uses to quiet the libraries: the user has none.
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
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
