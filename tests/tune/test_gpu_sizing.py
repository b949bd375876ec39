"""Trials sized to GPU memory (`gpus_per_trial: auto`): each trial's share from its own
estimate, refusals of trials that fit no GPU, and what each trial records. Ray's logical GPUs
on this CPU (`ray.init(num_gpus=1)`) stand in for a GPU: Ray packs trials by their shares, and
the trials train on the CPU. The caps themselves need CUDA (tests/test_gpu.py)."""

import dataclasses
import json
import re

import mlflow
import pytest
import ray

from sora_tune.config import TrialConfig
from sora_tune.memory import MEMORY_FIELDS, estimate_memory
from sora_tune.tune import SearchConfig, run_search
from sora_tune.tune.resources import (
    check_trials_fit,
    gpu_estimate,
    gpu_share,
    trial_gpus,
    trial_resources,
    worst_trials,
)
from sora_tune.tune.space import SearchSpace
from tests.test_memory import llama_31
from tests.tune.conftest import search_in, tiny_search_parameters

GIB = 2**30


@pytest.fixture(scope="module")
def logical_gpu():
    """A local Ray told this machine has one GPU, which torch does not see."""
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize(
    "estimate, share", [(1, 0.125), (GIB // 8, 0.125), (GIB // 8 + 1, 0.25), (GIB, 1.0)]
)
def test_shares_are_eighths_rounded_up(estimate, share):
    assert gpu_share(estimate, GIB) == share


def test_an_estimate_reads_only_the_memory_settings(tiny_trial):
    """Trials that agree on `MEMORY_FIELDS` share one estimate (`gpu_estimate` caches on them):
    every other setting leaves it as it is."""
    trial = TrialConfig.from_dict(tiny_trial)
    others = TrialConfig.from_dict(
        tiny_trial | {"lr": 0.1, "epochs": 9, "seed": 3, "xi": 0.5, "lam": 2.0, "task": "sst2"}
    )
    assert estimate_memory(others) == estimate_memory(trial)
    kept = TrialConfig.from_dict({name: getattr(trial, name) for name in MEMORY_FIELDS})
    assert estimate_memory(kept) == estimate_memory(trial)


def test_the_worst_trials_of_a_space():
    space = SearchSpace(
        distributions={
            "base_dtype": {"type": "choice", "values": ["fp32", "nf4"]},
            "r_max": {"type": "int", "low": 2, "high": 16},
            "batch_size": {"type": "choice", "values": [4, 16]},
            "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        },
        fixed={"max_length": 64},
    )
    worst = worst_trials(space)
    assert sorted(c.base_dtype for c in worst) == ["fp32", "nf4"]
    assert {(c.r_max, c.batch_size, c.max_length) for c in worst} == {(16, 16, 64)}


def test_a_trial_that_fits_no_gpu_is_refused_with_what_would_fit(tmp_path):
    """Llama-3.1-8B in fp32 (about 30 GB of weights) fits no 24 GB GPU; in bf16 or NF4 it
    does, at batch 8 × 256 tokens with checkpointing (tests/test_memory.py)."""
    model = llama_31("8B", tmp_path / "8b")
    fixed = {"model": model, "batch_size": 8, "max_length": 256, "gradient_checkpointing": True}
    space = SearchSpace(
        distributions={"base_dtype": {"type": "choice", "values": ["nf4", "fp32"]}}, fixed=fixed
    )
    with pytest.raises(ValueError) as refused:
        check_trials_fit(space, 24 * 10**9, "the 22.35 GiB of the smallest GPU")
    message = str(refused.value)
    assert "base_dtype fp32" in message and "needs an estimated" in message
    assert "more than the 22.35 GiB of the smallest GPU" in message
    assert "it would fit with base_dtype bf16" in message
    nf4 = SearchSpace(fixed=fixed | {"base_dtype": "nf4"})
    assert check_trials_fit(nf4, 24 * 10**9, "a GPU") < 12 * 10**9  # two trials a GPU


def test_a_trial_no_single_change_fits_is_told_so(tmp_path):
    model = llama_31("70B", tmp_path / "70b")
    space = SearchSpace(fixed={"model": model, "base_dtype": "bf16"})
    with pytest.raises(ValueError, match="no single change of base_dtype, gradient_checkpointing"):
        check_trials_fit(space, 24 * 10**9, "a 24 GB GPU")


def test_the_resource_request_is_the_trials_share(tiny_trial):
    estimate = gpu_estimate(TrialConfig.from_dict(tiny_trial)).total_bytes
    auto = {"gpus_per_trial": "auto", "gpu_bytes": 4 * GIB, "workers": 1}
    request = trial_resources(tiny_trial, cpus=1, gpus=auto)
    assert request.bundles == [{"CPU": 1, "GPU": gpu_share(estimate, 4 * GIB)}]
    half = {"gpus_per_trial": 0.5, "gpu_bytes": None, "workers": 1}
    assert trial_resources(tiny_trial, cpus=2, gpus=half).bundles == [{"CPU": 2, "GPU": 0.5}]
    assert trial_resources(tiny_trial, cpus=1, gpus=None).bundles == [{"CPU": 1}]


def test_a_worker_is_estimated_at_its_share_of_the_batch(tiny_trial):
    """One of 2 workers: activations of half the batch, the whole base and adapter, and the
    all-reduce's copy of the trained gradients (4 B each); its GPU share comes from that."""
    config = TrialConfig.from_dict(tiny_trial | {"batch_size": 16})
    one, worker = estimate_memory(config), estimate_memory(config, workers=2)
    half = estimate_memory(dataclasses.replace(config, batch_size=8))
    parts, worker_parts = ({p.name: p.bytes for p in e.parts} for e in (one, worker))
    assert worker_parts["activations"] == {p.name: p.bytes for p in half.parts}["activations"]
    for name in ("frozen weights", "adapter", "head", "CUDA context"):
        assert worker_parts[name] == parts[name]
    trained = (parts["adapter"] + parts["head"]) // 16  # 16 B a trained parameter
    assert worker_parts["all-reduce"] == 4 * trained
    assert worker.tensor_bytes == half.tensor_bytes + 4 * trained
    gpus = {"gpus_per_trial": "auto", "gpu_bytes": 4 * GIB, "workers": 2}
    assert trial_gpus(config, gpus) == gpu_share(worker.total_bytes, 4 * GIB)


def test_a_worker_that_fits_no_gpu_is_refused_per_worker(tmp_path):
    """Llama-3.1-8B in bf16 at batch 64 × 256 tokens needs more than a 24 GB GPU in one process;
    each of 8 workers (batch 8 each) fits. A refusal's smaller batches stay multiples of the
    workers."""
    model = llama_31("8B", tmp_path / "8b")
    fixed = {"model": model, "base_dtype": "bf16", "batch_size": 64, "max_length": 256}
    space = SearchSpace(fixed=fixed | {"gradient_checkpointing": True})
    budget = 24 * 10**9
    with pytest.raises(ValueError, match="needs an estimated"):
        check_trials_fit(space, budget, "a 24 GB GPU")
    assert check_trials_fit(space, budget, "a 24 GB GPU", workers=8) <= budget
    with pytest.raises(ValueError, match="for each of its 4 workers") as refused:
        check_trials_fit(SearchSpace(fixed=fixed), budget, "a 24 GB GPU", workers=4)
    halved = [int(b) for b in re.findall(r"batch_size (\d+) \(", str(refused.value))]
    assert halved and all(b % 4 == 0 for b in halved)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"gpus_per_trial": "half"}, "gpus_per_trial must be a number or auto, got 'half'"),
        ({"gpus_per_trial": -1}, "gpus_per_trial must be >= 0, got -1"),
        ({"gpu_memory": "24"}, "--gpu-memory '24' is not a memory size"),
    ],
)
def test_bad_gpu_settings_are_refused(tiny_trial, settings, message):
    space = SearchSpace(fixed=tiny_trial)
    with pytest.raises(ValueError, match=message):
        SearchConfig(space=space, **settings)


@pytest.mark.parametrize("gpu_memory, share", [("4GiB", 0.375), ("2GiB", 0.625)])
def test_auto_shares_pack_trials_by_their_estimates(
    logical_gpu, tiny_trial, write_space, tmp_path, capsys, gpu_memory, share
):
    """Two trials, each estimated at `share` of a GPU of `gpu_memory`: each asks Ray for its
    share, and each run records its share and estimate. Two 5/8 shares never run at once on the
    one logical GPU. (Two 3/8 shares may, but need not: Ray may hand the first trial's actor to
    the second when it ends before the second's is up, so only the reservations are checked.)"""
    _, space = write_space(tiny_search_parameters(tiny_trial) | {"epochs": 1})
    config, uri = search_in(
        tmp_path,
        space,
        "auto",
        num_samples=2,
        max_concurrent=2,
        gpus_per_trial="auto",
        gpu_memory=gpu_memory,
    )
    assert not run_search(config).results.errors
    gpu_bytes = int(gpu_memory.removesuffix("GiB")) * GIB
    expected = f"GPU shares: each trial's estimate in eighths of {gpu_bytes / GIB:.2f} GiB"
    assert expected in capsys.readouterr().out
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("auto").experiment_id], "tags.`sora_tune.role` = 'trial'"
    )
    assert len(runs) == 2
    for run in runs:
        estimate = gpu_estimate(
            TrialConfig.from_dict(tiny_trial | {"r_max": int(run.data.params["r_max"])})
        )
        assert gpu_share(estimate.total_bytes, gpu_bytes) == share
        assert float(run.data.params["gpu_share"]) == share
        assert json.loads(run.data.tags["ray_resources"])["GPU"] == share
        assert run.data.metrics["gpu_memory_estimated"] == estimate.total_bytes
        assert run.data.tags["sora_tune.device"] == "cpu"  # torch sees no CUDA here
        assert "gpu_memory_cap" not in run.data.params and "gpu_memory_peak" not in run.data.metrics
    if 2 * share > 1:
        first, second = sorted(runs, key=lambda r: r.info.start_time)
        assert second.info.start_time >= first.info.end_time, "two 5/8 shares ran at once"


def test_auto_shares_size_each_worker_of_a_trial(
    logical_gpu, tiny_trial, write_space, tmp_path, capsys
):
    """One trial of 2 workers with `auto`: each worker asks Ray for the share of one worker's
    estimate (2 × 3/8 of the one logical GPU), and rank 0 records that share, Ray's reservation
    of its worker and the worker's estimate, once."""
    _, space = write_space(tiny_search_parameters(tiny_trial) | {"epochs": 1, "r_max": 2})
    config, uri = search_in(
        tmp_path,
        space,
        "auto-workers",
        num_samples=1,
        gpus_per_trial="auto",
        gpu_memory="4GiB",
        workers_per_trial=2,
    )
    assert not run_search(config).results.errors
    assert "each worker's (of 2 a trial) estimate in eighths of 4.00 GiB" in capsys.readouterr().out
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("auto-workers").experiment_id],
        "tags.`sora_tune.role` = 'trial'",
    )
    estimate = gpu_estimate(TrialConfig.from_dict(tiny_trial | {"r_max": 2}), workers=2)
    share = gpu_share(estimate.total_bytes, 4 * GIB)
    assert share == 0.375
    assert float(run.data.params["gpu_share"]) == share
    assert json.loads(run.data.tags["ray_resources"]) == {"CPU": 1.0, "GPU": share}
    history = client.get_metric_history(run.info.run_id, "gpu_memory_estimated")
    assert [(m.value, m.step) for m in history] == [(estimate.total_bytes, 0)]
    assert run.data.tags["sora_tune.device"] == "cpu"  # torch sees no CUDA here


def test_auto_without_gpu_memory_asks_the_gpus(logical_gpu, tiny_trial, write_space, tmp_path):
    """The GPU Ray lists here is not one torch sees: the search says so before any trial."""
    _, space = write_space(tiny_search_parameters(tiny_trial))
    config, _ = search_in(tmp_path, space, "asks", num_samples=1, gpus_per_trial="auto")
    with pytest.raises(ValueError, match="torch sees no CUDA device there"):
        run_search(config)


def test_the_search_end_names_the_worst_peak_over_estimate(tmp_path):
    """What the end of a search prints from its trials' records: the largest measured peak over
    the estimate's tensors (here from runs logged as trials on a GPU log them)."""
    from sora_tune.pareto.runs import gpu_memory_line

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("peaks")
    parent = client.create_run(experiment).info.run_id
    assert gpu_memory_line(uri, parent) is None  # no trial measured a peak: nothing printed
    for name, peak in (("trial-a", 900), ("trial-b", 1100)):
        run = client.create_run(
            experiment, run_name=name, tags={"mlflow.parentRunId": parent}
        ).info.run_id
        client.log_metric(run, "gpu_memory_estimated_tensors", 1000, step=0)
        client.log_metric(run, "gpu_memory_peak", peak, step=1)
    line = gpu_memory_line(uri, parent)
    assert (
        line
        == "GPU memory: measured peak / estimate (tensors) at most 1.10, in trial-b (of 2 trials measured)"
    )
