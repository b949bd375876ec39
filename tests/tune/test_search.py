import os
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from sora_tune.tune import resume_search, run_search
from sora_tune.tune.schedulers import RUNGS_FILE
from sora_tune.tune.search import make_sampler
from sora_tune.tune.state import (
    SEARCH_STATE_FILE,
    read_json,
    read_search_state,
    write_search_state,
)
from sora_tune.uris import check_tracking_uri
from tests.tune.conftest import search_in, tiny_search_parameters


def child_runs(uri: str, experiment: str):
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    parents = [r for r in runs if r.data.tags.get("sora_tune.role") == "search"]
    children = [r for r in runs if r.data.tags.get("sora_tune.role") == "trial"]
    return parents, children


def test_multi_objective_search_records_every_trial(local_ray, tiny_trial, write_space, tmp_path):
    _, space = write_space(tiny_search_parameters(tiny_trial), points=[{"xi": 1e-4, "r_max": 4}])
    config, uri = search_in(tmp_path, space, "search", num_samples=4)
    results = run_search(config).results
    assert len(results) == 4 and not results.errors
    parents, children = child_runs(uri, "search")
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert {"sampler", "num_samples", "code_version", "cluster_resources"} <= set(
        parent.data.params
    )
    first = [
        r for r in children if r.data.params["xi"] == "0.0001" and r.data.params["r_max"] == "4"
    ]
    assert first, "points_to_evaluate runs first"
    client = mlflow.MlflowClient(uri)
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["ray_trial_id"]
        assert {"task", "model", "seed", "method", "xi", "eta", "lam", "r_max", "lr"} <= set(
            run.data.params
        )
        assert {
            "val_score",
            "test_score",
            "retained_params",
            "nonzero_rank",
            "train_time_s",
        } <= set(run.data.metrics)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_score")] == [1, 2]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"adapter", "rank_pattern.json"} <= artifacts


def test_a_failing_trial_is_recorded_and_the_others_finish(
    local_ray, tiny_trial, write_space, tmp_path, tiny_model_dir
):
    broken = tmp_path / "broken-model"  # a tokenizer and a config, but no weights
    broken.mkdir()
    for name in os.listdir(tiny_model_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(tiny_model_dir, name), broken)
    parameters = tiny_trial | {
        "epochs": 1,
        "model": {"type": "choice", "values": [tiny_model_dir, str(broken)]},
    }
    _, space = write_space(parameters, points=[{"model": str(broken)}, {"model": tiny_model_dir}])
    config, uri = search_in(tmp_path, space, "fail", num_samples=2, max_failures=0)
    results = run_search(config).results
    assert len(results.errors) == 1
    _, children = child_runs(uri, "fail")
    statuses = sorted(r.info.status for r in children)
    assert statuses == ["FAILED", "FINISHED"]
    failed = next(r for r in children if r.info.status == "FAILED")
    assert "Error" in failed.data.tags["failure_reason"]


def test_diverging_trial_is_recorded_as_failed(local_ray, tiny_trial, write_space, tmp_path):
    parameters = tiny_trial | {"epochs": 1, "lr": {"type": "choice", "values": [1e30, 5e-3]}}
    _, space = write_space(parameters, points=[{"lr": 1e30}, {"lr": 5e-3}])
    config, uri = search_in(tmp_path, space, "nan", num_samples=2)
    results = run_search(config).results
    assert not results.errors
    _, children = child_runs(uri, "nan")
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED"]
    failed = next(r for r in children if r.info.status == "FAILED")
    assert failed.data.tags["failure_reason"] == "trial diverged"


def test_resume_after_the_driver_is_killed(
    local_ray, mlflow_server, tiny_trial, write_space, tmp_path
):
    # The driver joins the test's Ray by --address, as it would join a cluster: that takes a
    # tracking server, which every node can reach.
    uri = mlflow_server.uri
    path, _ = write_space(tiny_search_parameters(tiny_trial) | {"epochs": 3})
    # A file:// URI takes the code path of s3:// and gs:// storage (pyarrow file systems).
    storage = f"file://{tmp_path / 'ray'}"
    command = [
        sys.executable,
        "-m",
        "sora_tune.cli",
        "search",
        "--config",
        str(path),
        "--num-samples",
        "4",
        "--max-concurrent",
        "1",
        "--mlflow-uri",
        uri,
        "--experiment-name",
        "resume",
        "--storage-path",
        storage,
        "--name",
        "resume",
        "--address",
        local_ray,
    ]
    driver = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        _, children = child_runs(uri, "resume")
        if sum(r.info.status == "FINISHED" for r in children) >= 2:
            break
        assert driver.poll() is None, "the search ended before it could be interrupted"
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(3)  # Ray notices the dead driver and stops its trial

    results = resume_search(f"{storage}/resume").results
    assert len(results) == 4
    _, children = child_runs(uri, "resume")
    assert len(children) == 4
    assert len({r.data.tags["ray_trial_id"] for r in children}) == 4
    assert all(r.info.status == "FINISHED" for r in children)


def test_search_state_round_trip_on_a_path_and_a_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = {"parent_run_id": "abc", "config": {"name": "s"}}
    write_search_state("searches/s", state)  # a relative path, as the CLI takes it
    assert read_search_state(f"file://{tmp_path}/searches/s") == state
    assert sorted(os.listdir(tmp_path / "searches" / "s")) == [SEARCH_STATE_FILE]
    with pytest.raises(FileNotFoundError, match="not a sora-tune search folder"):
        read_search_state(f"file://{tmp_path}/searches")


def test_unreachable_mlflow_server_fails_fast():
    start = time.time()
    with pytest.raises(ConnectionError, match="unreachable"):
        check_tracking_uri("http://127.0.0.1:9", timeout=2)
    assert time.time() - start < 5


def test_single_objective_search_with_asha(local_ray, tiny_trial, write_space, tmp_path):
    _, space = write_space(tiny_search_parameters(tiny_trial))
    config, uri = search_in(
        tmp_path, space, "asha", num_samples=2, objective="val_score", asha=True, sampler="random"
    )
    results = run_search(config).results
    assert len(results) == 2 and not results.errors
    _, children = child_runs(uri, "asha")
    assert len(children) == 2


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "gp", "random"])
def test_every_sampler_can_be_built(sampler):
    assert make_sampler(sampler, seed=0, num_samples=16) is not None


@pytest.mark.parametrize(("num_samples", "generations"), [(8, 2), (16, 4), (32, 4)])
def test_nsga2_leaves_its_random_first_generation_within_the_budget(num_samples, generations):
    """With Optuna's population of 50, a 16-trial search never left generation 0 (random)."""
    import optuna

    study = optuna.create_study(
        directions=["maximize", "minimize"],
        sampler=make_sampler("nsga2", seed=0, num_samples=num_samples),
    )
    study.optimize(
        lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=num_samples
    )
    last = study.trials[-1].system_attrs["NSGAIISampler:generation"]
    assert last + 1 == generations


def test_asha_needs_a_single_objective(tiny_trial, write_space, tmp_path):
    _, space = write_space(tiny_search_parameters(tiny_trial))
    with pytest.raises(ValueError, match="asha early stopping needs a single objective"):
        search_in(tmp_path, space, "x", asha=True)


def test_a_searched_budget_with_no_dense_phase(local_ray, tiny_trial, write_space, tmp_path):
    """`epochs` searched as a range is each trial's budget, and the rungs of early stopping go up
    to its high bound; a rising ξ schedule with `dense_epochs: 0` starts at its first raise."""
    parameters = tiny_trial | {
        "epochs": {"type": "int", "low": 1, "high": 3},
        "xi_total": 0.1,
        "xi_schedule": "linear",
        "xi_max": 0.5,
        "xi_stages": 2,
        "dense_epochs": 0,
        "r_max": {"type": "choice", "values": [2, 4]},
    }
    _, space = write_space(parameters)
    config, uri = search_in(tmp_path, space, "budget", num_samples=3, early_stop="pareto")
    result = run_search(config)
    assert not result.results.errors
    assert read_json(config.path, RUNGS_FILE)["rungs"] == [1]  # below the largest budget, 3
    parents, children = child_runs(uri, "budget")
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)
    client = mlflow.MlflowClient(uri)
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_score")]
        assert steps == list(range(1, len(steps) + 1))
        assert run.data.metrics["stage"] == 1  # two stages, the first with no epoch


def test_auto_on_a_cluster_without_gpus_is_refused(local_ray, tiny_trial, write_space, tmp_path):
    _, space = write_space(tiny_search_parameters(tiny_trial))
    config, _ = search_in(tmp_path, space, "none", num_samples=1, gpus_per_trial="auto")
    with pytest.raises(ValueError, match="the Ray cluster has no GPU"):
        run_search(config)
