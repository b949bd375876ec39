"""Early stopping of trials of several workers, end to end, under a Ray started with its
dashboard: Ray Train frees a stopped trial's workers through Ray's state API, which the
dashboard serves (`tune.workers.check_stops_free_workers`; the refusal without it is in
tests/tune/test_workers.py). Its own module: its Ray is not the tests' dashboard-less one."""

import importlib.util

import mlflow
import pytest
import ray

from sora_tune.tune import run_search
from tests.tune.conftest import search_in
from tests.tune.test_pareto_stopping import dominance_space, stopped_trials


@pytest.fixture(scope="module")
def ray_with_dashboard():
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("aiohttp_cors") is None,
    reason="needs ray[default] (pip install -e '.[dashboard]'), whose dashboard serves the state API",
)
def test_pareto_early_stopping_stops_two_worker_trials(
    ray_with_dashboard, tiny_trial, write_space, tmp_path
):
    """Three trials of 2 workers, one at a time, under MO-ASHA: the scheduler reads rank 0's
    reports through TuneReportCallback and stops the dominated trials at their first rung, and
    Ray frees each stopped trial's workers (the machine's 2 CPUs) for the next trial, which
    runs; each trial keeps one run."""
    parameters, points = dominance_space(tiny_trial)
    _, space = write_space(parameters, points=points)
    config, uri = search_in(
        tmp_path,
        space,
        "workers-mo-asha",
        num_samples=3,
        max_concurrent=1,
        early_stop="pareto",
        reduction_factor=3,
        workers_per_trial=2,
    )
    search = run_search(config)
    assert not search.results.errors
    assert stopped_trials(uri, "workers-mo-asha") == {"2": "finished", "4": "1", "8": "1"}
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([search.experiment_id], "tags.`sora_tune.role` = 'trial'")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
