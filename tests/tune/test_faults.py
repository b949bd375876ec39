"""Fault drills 3 and 4: a worker node dies mid-trial; the MLflow server is not there at start.

(Drills 1 and 2, a failing trial and a killed driver, are in test_search.py; drill 5, bad input,
is tests/test_errors.py.)
"""

import collections
import os
import subprocess
import sys
import threading
import time

import mlflow
import pytest

from sora_tune.tune import run_search
from tests.conftest import free_port, write_tiny_glue
from tests.tune.conftest import ray_cluster, search_in, tiny_search_parameters


def test_unreachable_mlflow_server_stops_the_search_before_any_trial(
    tiny_trial, write_space, tmp_path
):
    path, _ = write_space(tiny_search_parameters(tiny_trial))
    uri = f"http://127.0.0.1:{free_port()}"
    storage, ray_tmp = tmp_path / "ray", tmp_path / "ray-tmp"
    (ray_tmp / "ray").mkdir(parents=True)
    command = [
        sys.executable,
        "-m",
        "sora_tune.cli",
        "search",
        "--config",
        str(path),
        "--mlflow-uri",
        uri,
        "--storage-path",
        str(storage),
        "--name",
        "unreachable",
    ]
    # A private Ray temp folder: had Ray started, a session folder would appear in it.
    env = os.environ | {"RAY_TMPDIR": str(ray_tmp)}
    start = time.monotonic()
    search = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    elapsed = time.monotonic() - start
    assert search.returncode == 2, search.stderr
    assert f"sora-tune: error: MLflow server {uri} is unreachable" in search.stderr
    assert "Traceback" not in search.stderr
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert not storage.exists(), "no Ray experiment folder: no trial started"
    assert list((ray_tmp / "ray").iterdir()) == [], "Ray was not started"
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture
def worker_cluster():
    """A head that runs nothing (0 CPUs) and one worker node of 1 CPU: every trial runs on a
    worker, which the test may remove."""
    with ray_cluster(head_cpus=0, worker_cpus=1) as cluster:
        yield cluster


def val_score_steps(client: mlflow.MlflowClient, run_id: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, "val_score")]


def test_a_trial_on_a_lost_node_resumes_from_its_last_checkpoint(
    worker_cluster, mlflow_server, tiny_trial, write_space, tmp_path
):
    epochs = 8
    # Enough rows that an epoch lasts a second or two on the tiny model: time to remove the node
    # while the trial runs.
    glue = write_tiny_glue(tmp_path / "long-glue", n_train=1600, n_dev=16)
    parameters = tiny_search_parameters(tiny_trial) | {"epochs": epochs, "data_dir": str(glue)}
    _, space = write_space(parameters)
    config, uri = search_in(
        tmp_path, space, "lost-node", num_samples=1, max_failures=2, mlflow_uri=mlflow_server.uri
    )
    client = mlflow.MlflowClient(uri)
    mlflow.set_tracking_uri(uri)

    outcome: dict = {}

    def search() -> None:
        try:
            outcome["results"] = run_search(config).results
        except BaseException as err:  # surfaced by the main thread
            outcome["error"] = err

    driver = threading.Thread(target=search, daemon=True)
    driver.start()

    # Wait for the trial's run to log epoch 2: then epoch 1's checkpoint has been reported to
    # Ray (a trial logs an epoch to MLflow, then reports it with its checkpoint).
    run = None
    # Generous: on a loaded machine the worker's actor alone took 2 minutes to start.
    deadline = time.time() + 600
    while time.time() < deadline and "error" not in outcome:
        runs = mlflow.search_runs(
            experiment_names=["lost-node"],
            filter_string="tags.`sora_tune.role` = 'trial'",
            output_format="list",
        )
        if runs and max(val_score_steps(client, runs[0].info.run_id), default=0) >= 2:
            run = runs[0]
            break
        time.sleep(0.2)
    assert "error" not in outcome, outcome.get("error")
    assert run is not None, "the trial never reached epoch 2"
    steps_before = max(val_score_steps(client, run.info.run_id))
    assert steps_before < epochs, "the trial finished before the node could be removed"

    lost_node_id = run.data.tags["ray_node_id"]
    (lost,) = [n for n in worker_cluster.worker_nodes if n.node_id == lost_node_id]
    worker_cluster.remove_node(lost, allow_graceful=False)
    worker_cluster.add_node(num_cpus=1)  # somewhere for the retry to run

    driver.join(timeout=600)
    assert not driver.is_alive(), "the search did not finish"
    assert "error" not in outcome, outcome.get("error")
    results = outcome["results"]
    assert len(results) == 1 and not results.errors

    trials = mlflow.search_runs(
        experiment_names=["lost-node"],
        filter_string="tags.`sora_tune.role` = 'trial'",
        output_format="list",
    )
    assert len(trials) == 1, "the retried trial kept its one MLflow run"
    (trial,) = trials
    assert trial.info.status == "FINISHED"
    assert trial.data.tags["ray_node_id"] != lost_node_id, "the retry ran on another node"
    steps = collections.Counter(val_score_steps(client, trial.info.run_id))
    assert sorted(steps) == list(range(1, epochs + 1))
    # Resumed, not restarted: epoch 1 trained (and was logged) once. Only the epoch in flight
    # when the node died may have been logged twice.
    assert steps[1] == 1
    assert sum(steps.values()) <= epochs + 1
    assert results[0].metrics["epoch"] == epochs
