"""The Ray Tune trainable: one trial, on the device Ray assigned it, in its own MLflow run."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from ..config import TrialConfig
from ..front import OBJECTIVES
from ..tracking import DEVICE_TAG, ROLE_TAG, TrialRecord
from .resources import GpuRequest, OutOfGpuMemory, gpu_memory_plan

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


def stage_points(history: list[dict[str, Any]]) -> list[dict]:
    """The objectives at the end of every stage of a front-tracing trial, from its history."""
    return [
        {"stage": h["stage"], "nonzero_rank": h["nonzero_rank"]}
        | {key: h[key] for key in OBJECTIVES}
        for h in history
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


def run_trial(
    trial_params: dict[str, Any],
    *,
    data=None,
    sources=None,
    tracking: dict[str, str],
    gpus: GpuRequest | None = None,
) -> None:
    """The Ray Tune function trainable: one trial, its own MLflow child run, resumable. `data`
    and their `sources` are shared by the search (`None`: the trial prepares its own); `gpus`:
    how the search sized the trials' GPU shares (`None`: no GPU)."""
    import ray
    import torch
    from ray import tune

    from ..train import resolve_device, train_trial, trial_data, trial_dtypes  # torch: here

    trial_id = tune.get_context().get_trial_id()
    config = TrialConfig.from_dict(trial_params)
    client = MlflowClient(tracking["uri"])
    run_id = trial_run(client, tracking, trial_id, tune.get_context().get_trial_name())
    device = trial_device(
        ray.get_gpu_ids(),
        os.environ.get("CUDA_VISIBLE_DEVICES"),
        cuda=torch.cuda.is_available(),
    )
    client.set_tag(run_id, "ray_node_id", ray.get_runtime_context().get_node_id())
    # What Ray reserved for the trial (its GPU share among them), to check how trials packed.
    client.set_tag(
        run_id, RESOURCES_TAG, json.dumps(ray.get_runtime_context().get_assigned_resources())
    )
    client.set_tag(run_id, DEVICE_TAG, device)
    memory = gpu_memory_plan(config, gpus, device) if gpus is not None else None
    if memory is not None:
        memory.log(client, run_id)

    checkpoint = tune.get_checkpoint()
    # Not in the trial's Ray folder, which Ray copies to the storage path while trials write:
    # what lasts is reported as checkpoints and logged to MLflow.
    with (
        tempfile.TemporaryDirectory(prefix=f"sora-trial-{trial_id}-") as output_dir,
        checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume_from,
    ):
        record = TrialRecord(client, run_id, config, Path(output_dir))
        held_back: list[tuple[dict[str, Any], str]] = []

        def end_evaluation(metrics: dict[str, Any], checkpoint_dir: str) -> None:
            """The end of every epoch, after its checkpoint is written, in this order:

            1. Stop if Ray has let go of the trial: an interrupted search ends the sessions of
               the trials in flight, whose threads train on to the end of the epoch. Ray will
               not keep this epoch's checkpoint, so a resumed search trains the epoch again,
               and logs it then.
            2. Log it to MLflow.
            3. Report it with its checkpoint to Ray, where a scheduler may stop the trial
               (`SystemExit`). The last epoch is held back until the run is complete.
            """
            if tune.get_context().get_trial_id() != trial_id:  # `None` once the session ended
                raise SystemExit(f"trial {trial_id} stopped by Ray after epoch {metrics['epoch']}")
            record.log_evaluation(metrics)
            metrics = {k: metrics[k] for k in LIVE_TABLE_KEYS if k in metrics} | metrics
            metrics |= {BUDGET_KEY: config.epochs}
            metrics[COMPARABLE_KEY] = metrics["stage_end"] or not config.traces_front
            if metrics["epoch"] == config.epochs:
                # Held back until the run is complete: a scheduler may stop a trial at its last
                # epoch (ASHA at max_t), and Ray stops it inside the report.
                held_back.append((metrics, checkpoint_dir))
                return
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))

        try:
            with (
                record.open(trial_dtypes(config, resolve_device(device))),
                memory.capped() if memory is not None else contextlib.nullcontext(),
            ):
                data, task, sources = trial_data(config, data, sources)
                record.log_data(task, sources)
                result = train_trial(
                    config,
                    report=end_evaluation,
                    output_dir=output_dir,
                    data=data,
                    resume_from=resume_from,
                    device=device,
                )
        except OutOfGpuMemory:
            # Failed alone, its run FAILED with the reason (`record.open`); Ray would retry a
            # trial that raised, and it would run out again.
            result = {"status": "out_of_gpu_memory"}
            held_back.clear()
        else:
            if memory is not None:
                memory.log_peak(client, run_id, step=result.get("evaluation", 0))
            record.close(result)
        for metrics, checkpoint_dir in held_back:
            points = stage_points(result["history"])
            tune.report(
                metrics | ({STAGE_POINTS_KEY: points} if points else {}),
                checkpoint=tune.Checkpoint.from_directory(checkpoint_dir),
            )
    if result["status"] != "finished":
        # NaN objectives make Optuna record the trial as failed; the search goes on.
        tune.report(
            {"val_score": math.nan, "retained_params": math.nan, "status": result["status"]}
        )
