import csv
import json
import os

import mlflow
import pytest

from sora_tune.cli import main
from sora_tune.flags import parse_target_modules


def trial_flags(trial: dict) -> list[str]:
    flags = []
    for key, value in trial.items():
        flags += ["--" + key.replace("_", "-"), str(value)]
    return flags


def test_train_writes_adapter_and_metrics(tiny_trial, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *trial_flags(tiny_trial | {"epochs": 1}), "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["config"]["r_max"] == 4
    assert (out / "adapter" / "adapter_config.json").exists()
    assert "val_score" in capsys.readouterr().out


def test_train_logs_to_mlflow(tiny_trial, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # where the relative URI below lands
    flags = trial_flags(tiny_trial | {"epochs": 2})
    assert (
        main(
            [
                "train",
                *flags,
                "--output-dir",
                "run",
                "--mlflow-uri",
                "sqlite:///mlflow.db",
                "--experiment-name",
                "cli",
            ]
        )
        == 0
    )
    assert (tmp_path / "mlflow.db").exists()
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["cli"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["r_max"] == "4" and run.data.params["xi"] == "0.0001"
    assert {"val_score", "test_score", "retained_params", "nonzero_rank", "train_time_s"} <= set(
        run.data.metrics
    )
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "val_score")
    assert [m.step for m in history].count(1) == 1 and max(m.step for m in history) == 2
    artifacts = {
        a.path for a in mlflow.MlflowClient(uri).list_artifacts(run.info.run_id, "adapter")
    }
    assert "adapter/adapter_model.safetensors" in artifacts


def test_sparsify_traces_the_curve(tiny_trial, tmp_path):
    out = tmp_path / "sparsify"
    flags = trial_flags(
        tiny_trial | {"xi": 1e-3, "xi_max": 0.3, "xi_stages": 3, "xi_schedule": "geometric"}
    )
    assert main(["sparsify", *flags, "--output-dir", str(out)]) == 0
    with open(out / "sparsify.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["stage"]) for r in rows] == [0, 1, 2]
    assert [float(r["xi"]) for r in rows] == pytest.approx([1e-3, 1e-3 * 300**0.5, 0.3])
    params = [int(r["retained_params"]) for r in rows]
    assert params == sorted(params, reverse=True) and params[-1] < params[0]
    assert (out / "sparsify.png").stat().st_size > 0 and (out / "ranks.png").stat().st_size > 0
    # Run again on the finished folder: nothing is retrained and the curve keeps every stage.
    assert main(["sparsify", *flags, "--output-dir", str(out)]) == 0
    with open(out / "sparsify.csv") as handle:
        assert list(csv.DictReader(handle)) == rows


def test_bad_input_exits_with_a_message(tiny_trial, tmp_path, capsys):
    code = main(["train", "--task", "imdb", "--output-dir", str(tmp_path)])
    assert code == 2
    assert "Unknown GLUE task 'imdb'" in capsys.readouterr().err
    assert (
        main(["train", "--data-dir", str(tmp_path / "missing"), "--output-dir", str(tmp_path)]) == 2
    )
    assert "missing" in capsys.readouterr().err


def test_target_modules_flag():
    assert parse_target_modules("query,value") == ["query", "value"]
    assert parse_target_modules(r".*\.query") == r".*\.query"


def test_train_with_an_unreachable_mlflow_server_stops_before_training(
    tiny_trial, tmp_path, capsys
):
    out = tmp_path / "run"
    flags = ["--mlflow-uri", "http://127.0.0.1:9"]
    assert main(["train", *trial_flags(tiny_trial), "--output-dir", str(out), *flags]) == 2
    assert "unreachable" in capsys.readouterr().err
    assert not list(out.glob("checkpoint-epoch*"))


def test_a_ray_that_is_not_there_ends_in_one_line(mlflow_server, tiny_trial, tmp_path):
    """--address auto with no Ray running: Ray's start-up error, in one line, exit code 2 (and
    the traceback with --debug)."""
    import subprocess
    import sys

    import yaml

    (tmp_path / "space.yaml").write_text(
        yaml.safe_dump({"parameters": tiny_trial | {"lr": {"type": "choice", "values": [1e-3]}}})
    )
    ray_tmp = tmp_path / "ray-tmp"  # no ray_current_cluster file here: nothing to join
    (ray_tmp / "ray").mkdir(parents=True)
    command = [sys.executable, "-m", "sora_tune.cli", "search", "--config", "space.yaml"]
    command += ["--address", "auto", "--mlflow-uri", mlflow_server.uri]
    env = os.environ | {"RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": ""}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("sora-tune: error:")]
    assert len(errors) == 1 and "Ray" in errors[0]
    assert "Traceback" not in run.stderr
    debug = subprocess.run(
        [*command, "--debug"], env=env, capture_output=True, text=True, timeout=300
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr
