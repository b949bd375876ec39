"""A real local Ray and real MLflow stores for the search tests (nothing mocked)."""

import contextlib
import os

import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from sora_tune.tune import SearchConfig, load_search_space


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def write_space(tmp_path):
    """Write a search-space YAML built from the tiny trial settings and return it loaded."""

    def write(parameters: dict, points: list | None = None):
        path = tmp_path / "space.yaml"
        document = {"parameters": parameters}
        if points:
            document["points_to_evaluate"] = points
        path.write_text(yaml.safe_dump(document))
        return path, load_search_space(path)

    return write


def tiny_search_parameters(tiny_trial: dict) -> dict:
    """Fixed tiny-trial settings plus a small searched space."""
    fixed = tiny_trial | {"epochs": 2}
    return fixed | {
        "xi": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "r_max": {"type": "choice", "values": [2, 4]},
    }


def search_in(tmp_path, space, name: str, **settings) -> tuple[SearchConfig, str]:
    """A search of `space` as a user starts it from `tmp_path`, the test's folder: the default
    MLflow store (./mlflow.db) and a relative Ray storage path (./ray); the MLflow experiment and
    the Ray experiment are both called `name`. Returns it and the tracking URI it resolved to."""
    assert os.getcwd() == str(tmp_path), "tests run in their tmp_path"
    config = SearchConfig(
        space=space, experiment_name=name, storage_path="ray", name=name, **settings
    )
    return config, config.mlflow_uri


@contextlib.contextmanager
def ray_cluster(*, head_cpus: int, worker_cpus: int):
    """A multi-node Ray on this machine (`ray.cluster_utils.Cluster`): a head with `head_cpus`
    and one worker node with `worker_cpus`, this process connected to it."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus})
    cluster.add_node(num_cpus=worker_cpus)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
