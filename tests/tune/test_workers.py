"""Trials of several workers: each trial a Ray Train run of data-parallel workers, driven from
its Tune trial, recorded and reported as one trial (a real local Ray, nothing mocked)."""

import mlflow
import pytest
import yaml

from sora_tune.cli import main
from sora_tune.config import TrialConfig
from sora_tune.tune import SearchConfig
from sora_tune.tune.workers import DRIVER_RESOURCES, WorkerGroup, worker_backend
from tests.tune.conftest import tiny_search_parameters


def test_a_search_of_two_worker_trials_through_the_command_line(local_ray, tiny_trial, tmp_path):
    (tmp_path / "space.yaml").write_text(
        yaml.safe_dump({"parameters": tiny_search_parameters(tiny_trial)})
    )
    # One trial of 2 workers, a CPU each: the test's 2 CPUs (several trials: the slow test below)
    command = ["search", "--config", "space.yaml", "--num-samples", "1", "--name", "workers"]
    command += ["--workers-per-trial", "2"]
    assert main(command) == 0

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parents = [r for r in runs if r.data.tags.get("sora_tune.role") == "search"]
    trials = [r for r in runs if r.data.tags.get("sora_tune.role") == "trial"]
    assert len(parents) == 1 and parents[0].data.params["workers_per_trial"] == "2"
    # One run per trial, whatever its workers: rank 0 records, the others log nothing.
    assert len(trials) == 1
    client = mlflow.MlflowClient()
    for run in trials:
        assert run.info.status == "FINISHED", run.data.tags.get("failure_reason")
        assert run.data.params["workers_per_trial"] == "2"
        assert run.data.tags["sora_tune.device"] == "cpu"
        for key in run.data.metrics:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {steps}"
        history = client.get_metric_history(run.info.run_id, "val_score")
        assert [m.step for m in history] == [1, 2]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"adapter", "rank_pattern.json"} <= artifacts
    # The workers' checkpoints are the Train runs', one folder per trial
    train_runs = sorted(
        p.name for p in (tmp_path / "ray_results" / "workers" / "workers").iterdir()
    )
    assert train_runs == sorted(f"trial_{r.data.tags['ray_trial_id']}" for r in trials)


@pytest.mark.parametrize(
    "cluster, max_concurrent, cpus, gpus, expected",
    [
        ({"CPU": 2.0}, None, 1.0, 0.0, 1),  # 2 workers of a CPU: one trial at a time
        ({"CPU": 2.0}, 4, 0.5, 0.0, 2),
        ({"CPU": 64.0, "GPU": 8.0}, None, 4.0, 1.0, 4),  # the GPUs limit: 8 / (2 × 1)
        ({"CPU": 64.0, "GPU": 8.0}, 3, 4.0, 1.0, 3),  # max_concurrent limits first
        ({"CPU": 64.0, "GPU": 8.0}, None, 1.0, 0.5, 8),
    ],
)
def test_trials_at_once_count_whole_worker_groups(cluster, max_concurrent, cpus, gpus, expected):
    group = WorkerGroup(size=2, cpus=cpus, gpus=None, most_gpus=gpus, storage_path="s")
    assert group.trials_at_once(cluster, max_concurrent) == expected


def test_a_worker_group_the_cluster_cannot_hold_is_refused():
    group = WorkerGroup(size=8, cpus=1.0, gpus=None, most_gpus=1.0, storage_path="s")
    with pytest.raises(
        ValueError, match="needs 8 CPU and 8 GPU .* the Ray cluster has 64 CPU, 4 GPU"
    ):
        group.trials_at_once({"CPU": 64.0, "GPU": 4.0}, None)


def test_worker_groups_and_their_resources(write_space, tiny_trial):
    _, space = write_space(tiny_trial | {"r_max": {"type": "choice", "values": [2, 4]}})
    assert WorkerGroup.of(SearchConfig(space=space), None) is None  # one process: as before
    config = SearchConfig(space=space, workers_per_trial=4, gpus_per_trial=1, cpus_per_trial=2)
    gpus = {"gpus_per_trial": 1, "gpu_bytes": None, "workers": 4}
    group = WorkerGroup.of(config, gpus)
    assert (group.size, group.cpus, group.most_gpus) == (4, 2, 1)
    assert group.worker_gpus(TrialConfig.from_dict(tiny_trial)) == 1
    assert group.storage_path == f"{config.path}/workers"
    no_gpus = WorkerGroup.of(SearchConfig(space=space, workers_per_trial=2), None)
    assert no_gpus.most_gpus == 0 and no_gpus.worker_gpus(TrialConfig.from_dict(tiny_trial)) == 0
    # nccl between whole GPUs; gloo on the CPU and on GPU shares (two workers may get one GPU,
    # which nccl refuses)
    assert [worker_backend(g) for g in (1, 0, 0.5)] == ["nccl", "gloo", "gloo"]
    assert set(DRIVER_RESOURCES) == {"memory"}  # the driver takes nothing the workers need


@pytest.mark.parametrize(
    "batch_size, message",
    [
        (6, "batch_size 6 does not split across workers_per_trial 4"),
        ({"type": "choice", "values": [8, 12, 16]}, None),
        ({"type": "choice", "values": [8, 10]}, "batch_size 10 does not split"),
        ({"type": "int", "low": 8, "high": 16}, "search it as a choice of multiples of 4"),
    ],
)
def test_every_batch_size_must_split_across_the_workers(
    write_space, tiny_trial, batch_size, message
):
    _, space = write_space(
        tiny_trial | {"batch_size": batch_size, "r_max": {"type": "choice", "values": [2, 4]}}
    )
    if message is None:
        SearchConfig(space=space, workers_per_trial=4)
    else:
        with pytest.raises(ValueError, match=message):
            SearchConfig(space=space, workers_per_trial=4)
    SearchConfig(space=space)  # one process takes any batch


def test_early_stopping_of_worker_trials_needs_the_state_api(local_ray):
    """A Ray started without its dashboard (as the tests' `local_ray`) serves no state API, so
    Ray Train could never free a stopped trial's workers: refused before anything runs. (With
    it: tests/tune/test_workers_early_stop.py.)"""
    from sora_tune.tune.workers import check_stops_free_workers

    with pytest.raises(ValueError, match="needs Ray's state API to free a stopped trial's"):
        check_stops_free_workers()


def test_workers_per_trial_is_at_least_one(write_space, tiny_trial):
    _, space = write_space(tiny_trial | {"r_max": {"type": "choice", "values": [2, 4]}})
    with pytest.raises(ValueError, match="workers_per_trial must be >= 1, got 0"):
        SearchConfig(space=space, workers_per_trial=0)


def test_a_sharded_base_needs_several_workers(write_space, tiny_trial):
    _, space = write_space(tiny_trial | {"shard_base": True})
    SearchConfig(space=space, workers_per_trial=2)
    with pytest.raises(ValueError, match="shard_base needs workers_per_trial > 1"):
        SearchConfig(space=space)
