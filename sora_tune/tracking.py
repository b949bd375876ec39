"""MLflow records of trials: params, per-epoch metrics (`step=epoch`), the final scores and the
pruned adapter. Used by `sora-tune train --mlflow-uri` and by every trial of a search."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import mlflow

from .config import TrialConfig
from .train import train_trial


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics dict (MLflow metrics are floats)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def trial_params(config: TrialConfig) -> dict[str, str]:
    """Every trial setting as an MLflow param (`None` kept as the string "None"), with `eta` and
    `xi` as the trial uses them when left to their defaults. ξ set through `xi_total` depends on
    the steps; it is logged per epoch as the metrics `xi` and `xi_total`."""
    values = dataclasses.asdict(config) | {"eta": config.effective_eta}
    if config.xi_total is None:
        values["xi"] = config.xi_plan().xi
    return {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in values.items()}


def create_trial_run(tracking_uri: str, experiment_name: str) -> str:
    """A new MLflow run for one trial (the search makes its own, nested under its parent)."""
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.set_experiment(experiment_name)
    client = mlflow.MlflowClient(tracking_uri)
    return client.create_run(experiment.experiment_id, tags={"sora_tune.role": "trial"}).info.run_id


def tracked_trial(
    config: TrialConfig, *, run_id: str, output_dir: str | os.PathLike, **train_kwargs: Any
) -> dict[str, Any]:
    """Run `train_trial` inside the MLflow run `run_id` (created or resumed) and record it.

    The tracking URI must be set. A trial that diverges or raises ends its run FAILED with the
    reason in the tag `failure_reason`; a resumed trial logs into the same run.
    """
    user_report = train_kwargs.pop("report", None)

    def report(metrics: dict[str, Any], checkpoint: str) -> None:
        mlflow.log_metrics(numeric(metrics), step=metrics["epoch"])
        if user_report is not None:
            user_report(metrics, checkpoint)

    with mlflow.start_run(run_id=run_id):
        mlflow.log_params(trial_params(config))
        try:
            result = train_trial(config, report=report, output_dir=output_dir, **train_kwargs)
        except Exception as err:
            mlflow.set_tag("failure_reason", f"{type(err).__name__}: {err}"[:5000])
            raise
        result["mlflow_run_id"] = run_id
        # The final values are the last epoch's (pruning is exact), already logged at step=epoch:
        # MLflow's run.data.metrics shows the value at the highest step.
        if result["status"] != "finished":
            mlflow.set_tag("failure_reason", f"trial {result['status']}")
            mlflow.end_run(status="FAILED")
            return result
        adapter = Path(output_dir) / "adapter"
        if adapter.exists():
            mlflow.log_artifacts(str(adapter), artifact_path="adapter")
        mlflow.log_dict(result.get("rank_pattern", {}), "rank_pattern.json")
        mlflow.log_metric("head_params", result["head_params"], step=result["epoch"])
    return result
