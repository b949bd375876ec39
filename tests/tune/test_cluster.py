"""Two Ray nodes on one machine (`ray.cluster_utils.Cluster`): trials spread over both."""

import mlflow
import pytest
import ray

from sora_tune.tune import run_search
from tests.tune.conftest import ray_cluster, search_in, tiny_search_parameters


@pytest.fixture
def two_nodes():
    with ray_cluster(head_cpus=1, worker_cpus=1) as cluster:
        yield cluster


def test_trials_run_on_both_nodes(two_nodes, tiny_trial, write_space, tmp_path):
    # Trials long enough to overlap: with both nodes' single CPU busy, they must use both.
    _, space = write_space(tiny_search_parameters(tiny_trial) | {"epochs": 8})
    config, uri = search_in(
        tmp_path, space, "cluster", num_samples=4, cpus_per_trial=1, max_concurrent=2
    )
    results = run_search(config)
    assert len(results) == 4 and not results.errors
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["cluster"], output_format="list")
    nodes = {
        r.data.tags["ray_node_id"] for r in runs if r.data.tags.get("sora_tune.role") == "trial"
    }
    assert nodes == {node["NodeID"] for node in ray.nodes() if node["Alive"]}
