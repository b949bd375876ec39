"""Two Ray nodes on one machine (`ray.cluster_utils.Cluster`), as a cluster of two machines is
treated: trials spread over both nodes and log to a real `mlflow server --serve-artifacts`; a
local store or a file missing on a node stops the search before any trial."""

import os
import subprocess
import sys

import mlflow
import pytest
import ray

from sora_tune.tune import SearchConfig, run_search
from sora_tune.tune.cluster import check_paths_on_nodes
from tests.tune.conftest import ray_cluster, search_in, tiny_search_parameters


@pytest.fixture(scope="module")
def two_nodes():
    with ray_cluster(head_cpus=1, worker_cpus=1) as cluster:
        yield cluster


def test_trials_on_both_nodes_log_adapters_to_the_server(
    two_nodes, mlflow_server, tiny_trial, write_space, tmp_path
):
    # Trials long enough to overlap: with both nodes' single CPU busy, they must use both.
    # ξ this small prunes few ranks, so every trial exports an adapter.
    parameters = tiny_search_parameters(tiny_trial) | {
        "epochs": 8,
        "xi": {"type": "loguniform", "low": 1e-5, "high": 1e-4},
    }
    _, space = write_space(parameters)
    config, uri = search_in(
        tmp_path,
        space,
        "cluster",
        num_samples=4,
        cpus_per_trial=1,
        max_concurrent=2,
        mlflow_uri=mlflow_server.uri,
    )
    assert uri == mlflow_server.uri
    results = run_search(config).results
    assert len(results) == 4 and not results.errors
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(
        experiment_names=["cluster"],
        filter_string="tags.`sora_tune.role` = 'trial'",
        output_format="list",
    )
    assert {r.data.tags["ray_node_id"] for r in runs} == {
        node["NodeID"] for node in ray.nodes() if node["Alive"]
    }
    # Every adapter went through the server into its artifact root (the experiment's folder).
    experiment_id = mlflow.MlflowClient(uri).get_experiment_by_name("cluster").experiment_id
    stored = list((mlflow_server.artifacts / experiment_id).rglob("adapter_model.safetensors"))
    assert len(stored) == 4 and {p.parent.name for p in stored} == {"adapter"}

    # From another folder, with nothing of the search's on disk: register, then predict.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "rows.csv").write_text("sentence1,sentence2\nred blue,red blue\nold new,dark\n")
    command = [sys.executable, "-m", "sora_tune.cli"]
    tracking = ["--mlflow-uri", uri]
    register = subprocess.run(
        [*command, "register", "--experiment", "cluster", "--name", "cluster-mrpc", *tracking],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert register.returncode == 0, register.stderr
    predict = subprocess.run(
        [*command, "predict", "--model", "models:/cluster-mrpc@champion", "--input", "rows.csv"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"MLFLOW_TRACKING_URI": uri},
    )
    assert predict.returncode == 0, predict.stderr
    assert predict.stdout.splitlines()[0].startswith("label,probability")
    assert len(predict.stdout.splitlines()) == 3


def test_a_local_store_is_refused_before_any_trial(two_nodes, tiny_trial, write_space, tmp_path):
    path, space = write_space(tiny_search_parameters(tiny_trial))
    config, _ = search_in(tmp_path, space, "local-store", num_samples=1)  # ./mlflow.db
    with pytest.raises(
        ValueError, match="is a store on this machine, but trials run on 2 Ray nodes"
    ):
        run_search(config)
    assert not (tmp_path / "ray" / "local-store").exists(), "no trial started"


def test_a_path_missing_on_the_nodes_is_named(two_nodes, tmp_path):
    with pytest.raises(ValueError, match=r"model /no/such/model is not on node .* is not on node"):
        check_paths_on_nodes({"model": ["/no/such/model"], "data_dir": [str(tmp_path)]})
    check_paths_on_nodes({"data_dir": [str(tmp_path)]})  # one machine: every node sees it


def test_an_address_with_a_local_store_is_refused_at_once(tiny_trial, write_space):
    _, space = write_space(tiny_search_parameters(tiny_trial))
    with pytest.raises(ValueError, match="a trial on another machine cannot write its adapter"):
        SearchConfig(space=space, address="auto")


def test_ray_client_needs_a_storage_uri(tiny_trial, write_space):
    _, space = write_space(tiny_search_parameters(tiny_trial))
    with pytest.raises(ValueError, match="runs the search's Tuner on the cluster's head node"):
        SearchConfig(space=space, address="ray://head:10001", mlflow_uri="http://mlflow:5000")
    config = SearchConfig(
        space=space,
        address="ray://head:10001",
        mlflow_uri="http://mlflow:5000",
        storage_path="s3://bucket/searches",
    )
    assert config.path.startswith("s3://bucket/searches/")


def test_more_than_one_gpu_per_trial_is_refused(tiny_trial, write_space):
    _, space = write_space(tiny_search_parameters(tiny_trial))
    with pytest.raises(ValueError, match="gpus_per_trial must be at most 1, got 2: a trial is one"):
        SearchConfig(space=space, gpus_per_trial=2)
