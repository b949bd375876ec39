"""Ctrl-C (SIGINT) or SIGTERM on the driver: the search stops gracefully, the parent run and the
trials in flight end KILLED ("search interrupted"), and --resume continues them in the same runs,
where every metric holds one value per epoch. The driver is a real `sora-tune search` process
with its own Ray, as a user runs it."""

import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
import yaml

from sora_tune.tune.search import stop_gracefully_on_signals
from sora_tune.uris import local_store_path
from tests.conftest import write_tiny_glue
from tests.tune.conftest import tiny_search_parameters

COMMAND = [sys.executable, "-m", "sora_tune.cli", "search"]


def trial_runs(client: mlflow.MlflowClient, experiment: str):
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], "tags.`sora_tune.role` = 'trial'")


def test_sigterm_stops_a_search_as_sigint_does():
    """Both signals go to Ray Tune's handler (which it installs for SIGUSR1 when `fit` starts);
    a second one stops at once. The slow SIGTERM run below shows the same end to end."""
    handled, before = [], signal.getsignal(signal.SIGTERM)
    with stop_gracefully_on_signals() as received:
        signal.signal(signal.SIGUSR1, lambda signum, frame: handled.append(signum))
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert received == ["SIGTERM", "SIGINT"] and handled == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) == before  # restored


@pytest.fixture
def shared_stores(request, tmp_path) -> tuple[str, list[str]]:
    """MLflow's runs and Optuna's study in PostgreSQL, as a team's shared cluster keeps them,
    where a server is installed (the `postgres` fixture); else the default sqlite file and an
    in-memory study. Returns the tracking URI and the search's flags for them."""
    try:
        postgres = request.getfixturevalue("postgres")
    except pytest.skip.Exception:
        return f"sqlite:///{tmp_path / 'mlflow.db'}", []
    mlflow_uri = postgres.database("resume_mlflow")
    optuna_uri = postgres.database("resume_optuna")
    return mlflow_uri, ["--mlflow-uri", mlflow_uri, "--optuna-storage", optuna_uri]


def test_an_interrupted_search_resumes_into_the_same_runs(shared_stores, tiny_trial, tmp_path):
    mlflow_uri, stores = shared_stores
    interrupt_and_resume(signal.SIGINT, tiny_trial, tmp_path, mlflow_uri, stores)
    if stores:  # the study Optuna reloaded on --resume holds every trial
        study = optuna.load_study(study_name="stopped", storage=stores[-1])
        assert len(study.trials) == 3


# The default store, and SIGTERM: the same path as above, so kept out of the default run.
@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_search_on_sqlite_resumes_into_the_same_runs(stop, tiny_trial, tmp_path):
    interrupt_and_resume(stop, tiny_trial, tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")


def interrupt_and_resume(
    stop: signal.Signals, tiny_trial: dict, tmp_path, mlflow_uri: str, stores: list[str] = ()
) -> None:
    """Start a search as a user does, signal it while a trial is in its second epoch, check
    what it leaves, resume it and check that the runs were continued."""
    # Epochs of a second or so, so that the signal comes while a trial runs.
    glue = write_tiny_glue(tmp_path / "long-glue", n_train=400, n_dev=16)
    parameters = tiny_search_parameters(tiny_trial) | {"epochs": 6, "data_dir": str(glue)}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"parameters": parameters}))
    search = [*COMMAND, "--config", "space.yaml", "--num-samples", "3", "--max-concurrent", "1"]
    search += ["--storage-path", "ray", "--name", "stopped", "--experiment-name", "stopped"]
    env = os.environ | {"RAY_ADDRESS": ""}  # a Ray of its own, as from a terminal
    driver = subprocess.Popen(
        [*search, *stores], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    client = mlflow.MlflowClient(mlflow_uri)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert driver.poll() is None, driver.stdout.read()
        # A sqlite file the driver has not made yet would be made here, beside its own making.
        made = local_store_path(mlflow_uri) is None or local_store_path(mlflow_uri).exists()
        runs = trial_runs(client, "stopped") if made else []
        # At epoch 2, epoch 1's checkpoint is in Ray's experiment state (a trial logs an epoch,
        # then reports it with its checkpoint, and goes on once Ray has saved it).
        if any(r.info.status == "RUNNING" and r.data.metrics.get("epoch", 0) >= 2 for r in runs):
            break
        time.sleep(0.2)
    else:
        pytest.fail("no trial reached its second epoch")
    driver.send_signal(stop)
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 130, out
    assert f"search interrupted ({stop.name})" in out
    assert "sora-tune search --resume" in out

    (parent,) = client.search_runs(
        [client.get_experiment_by_name("stopped").experiment_id], "tags.`sora_tune.role` = 'search'"
    )
    assert parent.info.status == "KILLED"
    assert parent.data.tags["sora_tune.interrupted_by"] == stop.name
    before = {r.info.run_id: r for r in trial_runs(client, "stopped")}
    killed = [r for r in before.values() if r.info.status == "KILLED"]
    assert killed, "the trial in flight ended KILLED"
    assert {r.data.tags["failure_reason"] for r in killed} == {"search interrupted"}
    assert all(r.info.status in ("KILLED", "FINISHED") for r in before.values())

    resumed = subprocess.run(
        [*COMMAND, "--resume", "ray/stopped"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = {r.info.run_id: r for r in trial_runs(client, "stopped")}
    assert len(after) == 3 and set(before) <= set(after), "the killed runs were continued"
    assert all(r.info.status == "FINISHED" for r in after.values())
    for run in after.values():  # the killed ones continued from their checkpoints
        for key in run.data.metrics:  # every epoch logged once, whenever the signal came
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (run.info.run_name, key, sorted(steps))
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_score")]
        assert sorted(steps) == list(range(1, 7))
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
