"""The Ray Tune trainable: one trial, on the device Ray assigned it, in its own MLflow run."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient

from ..config import TrialConfig
from ..front import OBJECTIVES
from ..tracking import DEVICE_TAG, ROLE_TAG, TrialRecord
from .resources import GpuMemoryPlan, GpuRequest, OutOfGpuMemory, gpu_memory_plan

if TYPE_CHECKING:
    from .workers import WorkerGroup

# The MLflow param of every trial run and of the search's parent run: the trial's processes.
WORKERS_PARAM = "workers_per_trial"

# Reported with every epoch, so that whoever reads a trial's last result (the searcher, a
# scheduler, the end-of-search table) can tell a trial stopped early from one that finished.
BUDGET_KEY = "budget_epochs"
# In every report: whether Pareto early stopping may compare it with other trials at a rung. A
# front-tracing trial is compared at stage ends only, where its adapter is pruned to the stage's
# ranks, not in its dense phase, where retained_params is only r_max's.
COMPARABLE_KEY = "comparable"
# In a front-tracing trial's last result: the objectives at the end of every stage.
STAGE_POINTS_KEY = "stage_points"
# The trial run's tag of the resources Ray assigned it.
RESOURCES_TAG = "ray_resources"
# Reported first: Ray's live table shows a result's first four metrics.
LIVE_TABLE_KEYS = ("epoch", "val_score", "retained_params", "test_score")


def stage_points(result: dict[str, Any]) -> list[dict]:
    """The objectives of every point of a front-tracing trial, from its result: the end of
    every stage in its history, then its threshold points."""
    return [
        {"stage": h["stage"], "nonzero_rank": h["nonzero_rank"]}
        | {key: h[key] for key in OBJECTIVES}
        for h in [*result["history"], *result.get("threshold_points", [])]
        if h["stage_end"]
    ]


def trial_dirname(trial) -> str:
    """A trial's folder under the search's: its id. Ray's default name lists every setting."""
    return f"trial_{trial.trial_id}"


def trial_device(
    gpu_ids: list[str] | list[int], visible_devices: str | None, *, cuda: bool = True
) -> str:
    """The torch device of a trial that Ray assigned the GPUs `gpu_ids` (`ray.get_gpu_ids()`).

    No GPU means the CPU, even on a GPU node: Ray no longer hides the node's GPUs from actors
    that asked for none (ray-project/ray#62492), so `torch.cuda.is_available()` says nothing
    about the trial's share. Otherwise the first assigned GPU, numbered as torch sees it: its
    position in `CUDA_VISIBLE_DEVICES`, which Ray sets to the assigned ids (or the id itself
    where Ray was told not to set it). GPUs Ray lists where torch has no `cuda` (logical GPUs
    given to `ray.init(num_gpus=...)`, a CPU build of torch) leave the trial on the CPU; its
    run's device tag says so.

    Raises:
        RuntimeError: an assigned id that is neither listed nor a number.
    """
    if not gpu_ids or not cuda:
        return "cpu"
    first = str(gpu_ids[0])
    listed = [d.strip() for d in (visible_devices or "").split(",") if d.strip()]
    if first in listed:
        return f"cuda:{listed.index(first)}"
    if first.isdigit():
        return f"cuda:{first}"
    raise RuntimeError(
        f"Ray assigned GPU {first!r}, which CUDA_VISIBLE_DEVICES={visible_devices!r} does not list"
    )


def find_trial_run(
    client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str
) -> str | None:
    """The MLflow run a Ray trial already has (after a restart or a resumed search), if any."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.ray_trial_id = '{trial_id}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def trial_run(client: MlflowClient, tracking: dict[str, str], trial_id: str, name: str) -> str:
    """The MLflow run of a Ray trial, nested under the search's: the one it already has (a
    retried or resumed trial keeps its run), or a new one."""
    run_id = find_trial_run(client, tracking["experiment_id"], tracking["parent_run_id"], trial_id)
    if run_id is not None:
        return run_id
    tags = {
        "mlflow.parentRunId": tracking["parent_run_id"],
        "ray_trial_id": trial_id,
        ROLE_TAG: "trial",
        "mlflow.runName": name,
    }
    return client.create_run(tracking["experiment_id"], tags=tags).info.run_id


def record_placement(client: MlflowClient, run_id: str, device: str) -> None:
    """Tag the trial's run with where it trains: the Ray node and the torch device (rank 0's,
    for a trial of several workers)."""
    import ray

    client.set_tag(run_id, "ray_node_id", ray.get_runtime_context().get_node_id())
    # What Ray reserved for the trial (its GPU share among them), to check how trials packed.
    client.set_tag(
        run_id, RESOURCES_TAG, json.dumps(ray.get_runtime_context().get_assigned_resources())
    )
    client.set_tag(run_id, DEVICE_TAG, device)


def run_trial(
    trial_params: dict[str, Any],
    *,
    data=None,
    sources=None,
    tracking: dict[str, str],
    gpus: GpuRequest | None = None,
    workers: WorkerGroup | None = None,
) -> None:
    """The Ray Tune function trainable: one trial, its own MLflow child run, resumable. `data`
    and their `sources` are shared by the search (`None`: the trial prepares its own); `gpus`:
    how the search sized the trials' GPU shares (`None`: no GPU). With `workers`, the trial is a
    Ray Train run of that many workers, which this function drives."""
    import ray
    import torch
    from ray import tune

    from ..train import resolve_device, trial_dtypes  # torch: here

    trial_id = tune.get_context().get_trial_id()
    config = TrialConfig.from_dict(trial_params)
    client = MlflowClient(tracking["uri"])
    run_id = trial_run(client, tracking, trial_id, tune.get_context().get_trial_name())
    client.log_param(run_id, WORKERS_PARAM, str(workers.size if workers else 1))
    if workers is not None:
        from .workers import run_workers  # Ray Train: here

        run_workers(config, workers, trial_id, run_id, tracking["uri"], data=data, sources=sources)
        return
    device = trial_device(
        ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"), cuda=torch.cuda.is_available()
    )
    record_placement(client, run_id, device)
    memory = gpu_memory_plan(config, gpus, device) if gpus is not None else None
    if memory is not None:
        memory.log(client, run_id)

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    def check_running(metrics: dict[str, Any]) -> None:
        # An interrupted search ends the sessions of the trials in flight, whose threads train
        # on to the end of the epoch. Ray will not keep this epoch's checkpoint, so a resumed
        # search trains the epoch again, and logs it then.
        if tune.get_context().get_trial_id() != trial_id:  # `None` once the session ended
            raise SystemExit(f"trial {trial_id} stopped by Ray after epoch {metrics['epoch']}")

    checkpoint = tune.get_checkpoint()
    # Not in the trial's Ray folder, which Ray copies to the storage path while trials write:
    # what lasts is reported as checkpoints and logged to MLflow.
    with (
        tempfile.TemporaryDirectory(prefix=f"sora-trial-{trial_id}-") as output_dir,
        checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume_from,
    ):
        train_and_report(
            config,
            report,
            record=TrialRecord(client, run_id, config, Path(output_dir)),
            dtypes=trial_dtypes(config, resolve_device(device)),
            check_running=check_running,
            memory=memory,
            data=data,
            sources=sources,
            output_dir=output_dir,
            resume_from=resume_from,
            device=device,
        )


def train_and_report(
    config: TrialConfig,
    report: Callable[[dict[str, Any], str | None], None],
    *,
    record: TrialRecord | None,
    dtypes: dict[str, str],
    check_running: Callable[[dict[str, Any]], None] | None = None,
    memory: GpuMemoryPlan | None = None,
    data=None,
    sources=None,
    **train_kwargs: Any,
) -> dict[str, Any]:
    """Train a trial (`train_trial` with `train_kwargs`), record it in MLflow and report it to
    Ray: the body of a one-process trial and of every worker of a trial of several.

    Args:
        config: The trial's settings.
        report: Reports metrics and a checkpoint folder (`None`: none) to Ray: `tune.report`,
            or `ray.train.report` on every worker of a Ray Train run, which must all report
            alike (rank 0's metrics and checkpoint are the ones Ray keeps).
        record: The trial's MLflow run; `None` on workers other than rank 0, which log nothing.
        dtypes: The precision and base dtype the run is tagged with (`train.trial_dtypes`).
        check_running: Called first at every evaluation; raises if Ray has let go of the trial.
        memory: The trial's GPU memory plan: capped to it while it trains, its peak logged.
        data, sources: The search's shared data and their sources (`None`: prepared here).

    The end of every evaluation, after its checkpoint is written: `check_running`, then the
    MLflow record, then the report, where a scheduler may stop the trial (`SystemExit`). The last
    epoch is held back until the run is complete: a scheduler may stop a trial at its last epoch
    (ASHA at max_t), and Ray stops it inside the report. A trial that diverged reports NaN
    objectives, which make Optuna record it as failed while the search goes on.

    Returns:
        `train_trial`'s result.
    """
    from ..train import train_trial, trial_data  # torch: here

    held_back: list[tuple[dict[str, Any], str | None]] = []

    def end_evaluation(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if check_running is not None:
            check_running(metrics)
        if record is not None:
            record.log_evaluation(metrics)
        metrics = {k: metrics[k] for k in LIVE_TABLE_KEYS if k in metrics} | metrics
        metrics |= {BUDGET_KEY: config.epochs}
        # A trial with threshold points is the constant trial it trains as until its end.
        metrics[COMPARABLE_KEY] = metrics["stage_end"] or config.xi_schedule == "constant"
        if metrics["epoch"] == config.epochs:
            held_back.append((metrics, checkpoint_dir))
            return
        report(metrics, checkpoint_dir)

    try:
        with (
            record.open(dtypes) if record is not None else contextlib.nullcontext(),
            memory.capped() if memory is not None else contextlib.nullcontext(),
        ):
            data, task, sources = trial_data(config, data, sources)
            if record is not None:
                record.log_data(task, sources)
            result = train_trial(config, report=end_evaluation, data=data, **train_kwargs)
    except OutOfGpuMemory:
        workers = train_kwargs.get("workers")
        if workers is not None and workers.size > 1:
            # The other workers wait for this one in a collective: fail the Train run, which
            # ends them all (and Tune retries the trial as any whose worker failed).
            raise
        # Failed alone, its run FAILED with the reason (`record.open`); Ray would retry a trial
        # that raised, and it would run out again.
        result = {"status": "out_of_gpu_memory"}
        held_back.clear()
    else:
        if record is not None:
            if memory is not None:
                memory.log_peak(record.client, record.run_id, step=result.get("evaluation", 0))
            record.log_stage_points(result.get("threshold_points", []))
            record.close(result)
    for metrics, checkpoint_dir in held_back:
        points = stage_points(result)
        report(metrics | ({STAGE_POINTS_KEY: points} if points else {}), checkpoint_dir)
    if result["status"] != "finished":
        # NaN objectives make Optuna record the trial as failed; the search goes on.
        report(
            {"val_score": math.nan, "retained_params": math.nan, "status": result["status"]}, None
        )
    return result
