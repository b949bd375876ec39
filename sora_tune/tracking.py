"""MLflow records of trials: params, per-epoch metrics (`step=epoch`), the final scores and the
pruned adapter. Used by `sora-tune train --mlflow-uri` and by every trial of a search.

Everything goes through an `MlflowClient` and the run's id, not MLflow's active run: a trial
that Ray stops between epochs must leave its run open for the search to end, which the fluent
API's `with start_run()` would end as FAILED.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from .config import TrialConfig
from .data.tasks import GlueTask

if TYPE_CHECKING:
    from .data.files import DataSource

ROLE_TAG = "sora_tune.role"  # "search" on a search's parent run, "trial" on its trials
FAILURE_TAG = "failure_reason"  # why a run did not finish
PRECISION_TAG = "sora_tune.precision"  # the autocast dtype the trial trained and scored in
BASE_DTYPE_TAG = "sora_tune.base_dtype"  # how its frozen base was stored: fp32, bf16, … nf4
# The tag of each of `train.trial_dtypes`.
DTYPE_TAGS = {"precision": PRECISION_TAG, "base_dtype": BASE_DTYPE_TAG}
PAD_FROM_EOS_TAG = "sora_tune.pad_from_eos"  # "true": a decoder's eos padded its batches
PAIR_SEPARATOR_TAG = "sora_tune.pair_separator"  # JSON: what joined a text pair, null: nothing
DEVICE_TAG = "sora_tune.device"  # where the trial ran: cpu, cuda:0, ...
STOPPED_TAG = "sora_tune.stopped_at_epoch"  # a scheduler stopped the trial after this epoch
# The trial's data as JSON: name, text columns, label names, problem type, metrics and the primary
# one (what `register` writes into the model's model_info).
DATA_TAG = "sora_tune.data"
# A front-tracing trial logs each stage's point as `stage_<key>` at step = the stage, and the
# stage's pruned adapter under `adapters/stage-<k>/`.
STAGE_PREFIX = "stage_"
STAGE_KEYS = (
    "epoch",
    "val_score",
    "test_score",
    "train_score",
    "retained_params",
    "nonzero_rank",
    "train_time_s",
    "xi",
    "xi_total",
    "threshold",  # the |g| a threshold point zeroed up to (`threshold_quantiles`)
)


def data_description(task: GlueTask) -> dict[str, Any]:
    """The `DATA_TAG` of a trial on `task`."""
    return {
        "name": task.name,
        "text_fields": list(task.text_fields),
        "label_names": list(task.label_names) if task.label_names is not None else None,
        "problem_type": "regression" if task.is_regression else "single_label_classification",
        "metrics": list(task.metrics),
        "metric": task.primary,
    }


def stage_artifact(stage: int) -> str:
    return f"adapters/stage-{stage}"


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
    client = MlflowClient(tracking_uri)
    experiment_id = experiment_id_of(client, experiment_name)
    return client.create_run(experiment_id, tags={ROLE_TAG: "trial"}).info.run_id


def experiment_id_of(client: MlflowClient, name: str) -> str:
    """The id of the experiment `name`, created if needed. Through the client, unlike
    `mlflow.set_experiment`, which also sets the process's tracking URI and experiment."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def end_run(client: MlflowClient, run_id: str, status: str, reason: str | None = None) -> None:
    """End a trial's run with `status` (FINISHED, FAILED, KILLED), the reason in `failure_reason`."""
    if reason is not None:
        client.set_tag(run_id, FAILURE_TAG, reason[:5000])
    client.set_terminated(run_id, status=status)


@dataclass
class TrialRecord:
    """The MLflow run `run_id` of one trial while it trains: `open` it, `log_evaluation` after
    every evaluation (every epoch, or every `eval_steps`), `close` it with the trial's result.

    A front-tracing trial (`TrialConfig.traces_front`) also logs the end of every stage as soon
    as the stage ends: `stage_<key>` metrics at `step=stage` and the stage's pruned adapter (from
    `output_dir`) under `adapters/stage-<k>/`.
    """

    client: MlflowClient
    run_id: str
    config: TrialConfig
    output_dir: Path
    # Evaluations the run holds already: an earlier attempt of the trial logged them, and its
    # checkpoint did not last (a lost worker, a search stopped between the log and Ray's copy).
    logged_steps: set[int] = dataclasses.field(default_factory=set)

    @contextlib.contextmanager
    def open(self, dtypes: dict[str, str]) -> Iterator[None]:
        """Mark the run RUNNING (new, or reopened by a resumed trial) with the trial's params
        and its `dtypes` (`train.trial_dtypes`: the precision it trains and scores in, the
        base_dtype its base is stored in), for the block that trains it. Tagged now, not at the
        end: a trial a scheduler stops leaves points (its stages) scored in it.

        A trial that raises ends its run FAILED with the reason in `failure_reason`; one
        interrupted by Ctrl-C ends KILLED. A trial that Ray stops between epochs (`SystemExit`
        from its report) leaves the run open: the search, which knows why it stopped the trial
        (a scheduler, an interrupted search), ends it.
        """
        self.client.update_run(self.run_id, status="RUNNING")
        params = [Param(k, v) for k, v in trial_params(self.config).items()]
        tags = [RunTag(DTYPE_TAGS[name], value) for name, value in dtypes.items()]
        self.client.log_batch(self.run_id, params=params, tags=tags)
        history = self.client.get_metric_history(self.run_id, "evaluation")
        self.logged_steps = {int(metric.step) for metric in history}
        try:
            yield
        except Exception as err:
            end_run(self.client, self.run_id, "FAILED", f"{type(err).__name__}: {err}")
            raise
        except KeyboardInterrupt:
            end_run(self.client, self.run_id, "KILLED", "interrupted")
            raise

    def log_data(self, task: GlueTask, sources: Sequence[DataSource]) -> None:
        """What the trial trains on: `DATA_TAG`, and each split's file or dataset as an MLflow
        dataset input (name, source, content digest, rows read as the profile's `num_rows`;
        context `train`, `validation` or `test`),
        so a run shows which version of a file trained its adapter. Logging the same input again
        (a resumed trial) adds nothing."""
        self.client.set_tag(self.run_id, DATA_TAG, json.dumps(data_description(task)))
        inputs = [
            DatasetInput(
                Dataset(
                    name=source.name,
                    digest=source.digest,
                    source_type=source.source_type,
                    # The source as MLflow's own LocalArtifactDatasetSource and
                    # HuggingFaceDatasetSource write it.
                    source=json.dumps(
                        {"uri": source.source}
                        if source.source_type == "local"
                        else {
                            "path": source.source,
                            "config_name": source.config,
                            "split": source.name.rsplit(":", 1)[-1],
                        }
                    ),
                    # The rows read, as MLflow's own datasets profile them.
                    profile=json.dumps({"num_rows": source.num_rows})
                    if source.num_rows is not None
                    else None,
                ),
                tags=[InputTag(MLFLOW_DATASET_CONTEXT, source.split)],
            )
            for source in sources
        ]
        if not inputs:
            return
        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except MlflowException as err:
            # Trials of one search log the same files at once, and MLflow's store looks for
            # the dataset, then inserts it: of two trials, one can lose the race on the
            # dataset's unique key. Its second try finds the dataset the other inserted.
            if "unique" not in str(err).lower():
                raise
            self.client.log_inputs(self.run_id, datasets=inputs)

    def log_evaluation(self, metrics: dict[str, Any]) -> None:
        """An evaluation's metrics at `step=evaluation` (the epoch, when the trial evaluates
        every epoch), and the stage's point if it ends one. Every step holds one value: an
        evaluation that is trained again from an earlier checkpoint is not logged again
        (resuming is exact, so its scores are the ones logged)."""
        now = int(time.time() * 1000)
        step = metrics["evaluation"]
        if step in self.logged_steps:
            return
        self.logged_steps.add(step)
        logged = [Metric(k, v, now, step) for k, v in numeric(metrics).items()]
        if metrics["stage_end"]:  # a point of the front the trial traces
            logged += self._stage_point(metrics, now)
        self.client.log_batch(self.run_id, metrics=logged)

    def log_stage_points(self, points: list[dict[str, Any]]) -> None:
        """The points a trial leaves after its last evaluation (`threshold_quantiles`), as its
        stage ends are logged: `stage_<key>` at step = the stage, and the stage's adapter."""
        now = int(time.time() * 1000)
        logged = [metric for point in points for metric in self._stage_point(point, now)]
        if logged:
            self.client.log_batch(self.run_id, metrics=logged)

    def _stage_point(self, metrics: dict[str, Any], now: int) -> list[Metric]:
        """Log the stage's pruned adapter, if it has one, and return its `stage_<key>` metrics."""
        from .train import stage_adapter_dir  # torch, only where a trial runs

        stage = metrics["stage"]
        adapter = stage_adapter_dir(self.output_dir, stage)
        if adapter.exists():
            self.client.log_artifacts(
                self.run_id, str(adapter), artifact_path=stage_artifact(stage)
            )
        return [
            Metric(f"{STAGE_PREFIX}{k}", float(metrics[k]), now, stage)
            for k in STAGE_KEYS
            if k in metrics  # no test_score without a test set
        ]

    def close(self, result: dict[str, Any]) -> dict[str, Any]:
        """End the run with the trial's result: FAILED for a trial that diverged, else the
        pruned adapter, its rank pattern and `head_params`, then FINISHED. Returns `result` with
        `mlflow_run_id`."""
        result["mlflow_run_id"] = self.run_id
        self.client.set_tag(self.run_id, PAD_FROM_EOS_TAG, str(result["pad_from_eos"]).lower())
        self.client.set_tag(self.run_id, PAIR_SEPARATOR_TAG, json.dumps(result["pair_separator"]))
        if result["status"] != "finished":
            end_run(self.client, self.run_id, "FAILED", f"trial {result['status']}")
            return result
        # The final values are the last epoch's (pruning is exact), already logged at
        # step=epoch: MLflow's run.data.metrics shows the value at the highest step.
        adapter = self.output_dir / "adapter"
        if adapter.exists():
            self.client.log_artifacts(self.run_id, str(adapter), artifact_path="adapter")
        self.client.log_dict(self.run_id, result.get("rank_pattern", {}), "rank_pattern.json")
        if not self.client.get_metric_history(self.run_id, "head_params"):  # see log_evaluation
            self.client.log_metric(
                self.run_id, "head_params", result["head_params"], step=result["evaluation"]
            )
        end_run(self.client, self.run_id, "FINISHED")
        return result


def tracked_trial(
    config: TrialConfig,
    *,
    run_id: str,
    tracking_uri: str,
    output_dir: str | os.PathLike,
    report: Callable[[dict[str, Any], str], None] | None = None,
    **train_kwargs: Any,
) -> dict[str, Any]:
    """Run `train_trial` in the MLflow run `run_id` and record it (`TrialRecord`): params, its
    data, every evaluation's metrics at `step=evaluation` (then `report`, if given), the pruned
    adapter, its rank pattern and the precision and base dtype used."""
    from .train import resolve_device, train_trial, trial_data, trial_dtypes  # torch: here

    record = TrialRecord(MlflowClient(tracking_uri), run_id, config, Path(output_dir))
    device = resolve_device(train_kwargs.get("device"))

    def end_evaluation(metrics: dict[str, Any], checkpoint: str) -> None:
        record.log_evaluation(metrics)
        if report is not None:
            report(metrics, checkpoint)

    with record.open(trial_dtypes(config, device)):
        data, task, sources = trial_data(config, train_kwargs.pop("data", None))
        record.log_data(task, sources)
        result = train_trial(
            config, report=end_evaluation, output_dir=output_dir, data=data, **train_kwargs
        )
    return record.close(result)
