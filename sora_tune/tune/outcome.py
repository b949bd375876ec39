"""How a trial ended, told the same way to MLflow, Optuna and the user.

- finished: the trial ran its epochs; it ends its own run FINISHED.
- diverged or raised: the trial ends its own run FAILED with the reason.
- stopped: a scheduler stopped it early. Ray stops it between epochs, so the trial leaves its
  run open; `TrialRecorder` ends it FINISHED with the tag `sora_tune.stopped_at_epoch`, and
  `StoppedAsPrunedOptunaSearch` tells Optuna PRUNED, never COMPLETE with the values of a smaller
  budget.
- lost: its worker died for good; the run ends FAILED, "worker lost".
- killed: the search was interrupted (SIGINT, SIGTERM) while it ran; the run ends KILLED,
  "search interrupted", and `--resume` continues it in the same run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from ..front import default_reference, hypervolume
from ..tracking import STOPPED_TAG, end_run
from .trial import BUDGET_KEY, STAGE_POINTS_KEY, find_trial_run

INTERRUPTED = "search interrupted"
RAY_MODES = {"maximize": "max", "minimize": "min"}  # Ray Tune's spelling of a direction


def stopped_early(result: dict[str, Any] | None) -> bool:
    """Whether a trial's last result is of an epoch before its last: a scheduler stopped it."""
    if not result or "epoch" not in result or BUDGET_KEY not in result:
        return False
    return result["epoch"] < result[BUDGET_KEY]


def outcome(result: dict[str, Any] | None, error: bool) -> str:
    """`finished`, `stopped`, `diverged` or `error`, from a trial's last result."""
    if error:
        return "error"
    if stopped_early(result):
        return "stopped"
    return (result or {}).get("status", "finished")


def traced_point(
    result: dict[str, Any], directions: dict[str, str], told: np.ndarray | None = None
) -> dict[str, Any]:
    """What Optuna is told of a trial: its last values; for a front-tracing trial, which ends
    with several points of the front, the stage point that adds the most hypervolume to the
    search's front so far (`told`: the objective values Optuna holds for the finished trials),
    measured from the search's reference point (`default_reference` of those values and the
    trial's points): the point by which this trial moved the search's answer the most. A stage
    pruned to rank 0 is never told (there is no adapter to register). Ties, such as every point
    dominated by the front, go to the later stage."""
    points = [p for p in result.get(STAGE_POINTS_KEY) or [] if p.get("nonzero_rank", 1) > 0]
    values = np.array([[p[key] for key in directions] for p in points], dtype=float)
    finite = np.flatnonzero(~np.isnan(values).any(axis=1)) if points else []
    if len(finite) == 0:
        return result
    told = np.empty((0, len(directions))) if told is None else np.asarray(told, dtype=float)
    told = told[~np.isnan(told).any(axis=1)]
    signs = list(directions.values())
    reference = default_reference(np.vstack([told, values[finite]]), signs)
    base = hypervolume(told, signs, reference) if len(told) else 0.0
    gains = [
        hypervolume(np.vstack([told, values[i : i + 1]]), signs, reference) - base for i in finite
    ]
    best = finite[len(gains) - 1 - int(np.argmax(gains[::-1]))]
    return result | {key: points[best][key] for key in directions}


class StoppedAsPrunedOptunaSearch(OptunaSearch):
    """Ray's `OptunaSearch`, told what sora-tune's trials mean: a trial a scheduler stopped
    early is PRUNED (Ray tells it COMPLETE with its last, partial-budget values, which would put
    an under-trained adapter on Optuna's front and steer the sampler with it), and a
    front-tracing trial is told its `traced_point`.

    Args:
        directions: The objectives and their directions (`"maximize"`, `"minimize"`).
        **kwargs: The rest of `OptunaSearch`'s arguments (not `metric` and `mode`).
    """

    def __init__(self, directions: dict[str, str], **kwargs: Any) -> None:
        metrics, modes = list(directions), [RAY_MODES[d] for d in directions.values()]
        super().__init__(
            metric=metrics if len(metrics) > 1 else metrics[0],
            mode=modes if len(modes) > 1 else modes[0],
            **kwargs,
        )
        self.directions = dict(directions)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if stopped_early(result):
            result = None  # with no result and no error, Ray's OptunaSearch tells PRUNED
        elif result is not None and not error:
            result = traced_point(result, self.directions, self._told_values())
        super().on_trial_complete(trial_id, result, error)

    def _told_values(self) -> np.ndarray:
        """The objective values of the trials Optuna holds as COMPLETE: the search's front."""
        import optuna

        complete = self._ot_study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)
        )
        return np.array([t.values for t in complete], dtype=float).reshape(-1, len(self.directions))


class TrialRecorder(tune.Callback):
    """Ends the MLflow runs of trials that cannot end their own: one a scheduler stopped
    (FINISHED, tagged with its last epoch) and one whose worker was lost (FAILED), as soon as
    Ray knows. Runs on the driver, so it reaches the tracking server from there."""

    def __init__(self, tracking: dict[str, str]) -> None:
        self.tracking = tracking

    def _run_id(self, trial) -> str | None:
        return find_trial_run(
            MlflowClient(self.tracking["uri"]),
            self.tracking["experiment_id"],
            self.tracking["parent_run_id"],
            trial.trial_id,
        )

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = trial.last_result
        run_id = self._run_id(trial) if stopped_early(result) else None
        if run_id is not None:
            client = MlflowClient(self.tracking["uri"])
            client.set_tag(run_id, STOPPED_TAG, str(result["epoch"]))
            end_run(client, run_id, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        run_id = self._run_id(trial)
        if run_id is None:
            return
        client = MlflowClient(self.tracking["uri"])
        if client.get_run(run_id).info.status == "RUNNING":  # the trial could not end it
            end_run(client, run_id, "FAILED", f"worker lost: {_error_line(trial)}")


def _error_line(trial) -> str:
    """The last line of the error Ray recorded for a trial (its error file), or a placeholder."""
    path = getattr(trial, "error_file", None)
    try:
        lines = Path(path).read_text().strip().splitlines() if path else []
    except OSError:
        lines = []
    return lines[-1] if lines else "the trial's process ended"


def close_open_runs(
    client: MlflowClient,
    experiment_id: str,
    parent_run_id: str,
    results,
    *,
    interrupted: bool,
) -> list[str]:
    """End the trial runs still RUNNING once `Tuner.fit` returns; returns their Ray trial ids.

    After an interrupted search they are the trials in flight: KILLED, "search interrupted",
    and `--resume` reopens them. Otherwise a run of a trial Ray knows lost its worker for good
    (FAILED, "worker lost"); any other open run belongs to a trial that a killed driver had
    started but not yet saved in its experiment state, which the resumed search ran again as
    another trial: it is deleted (MLflow keeps deleted runs restorable).
    """
    # A trial's folder name carries its id, also for trials that errored before any report.
    folders = [Path(result.path).name for result in results]
    open_runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'",
    )
    for run in open_runs:
        trial_id = run.data.tags.get("ray_trial_id", "")
        known = bool(trial_id) and any(trial_id in folder for folder in folders)
        if interrupted:
            end_run(client, run.info.run_id, "KILLED", INTERRUPTED)
        elif known:
            end_run(client, run.info.run_id, "FAILED", "worker lost, trial did not finish")
        else:
            end_run(client, run.info.run_id, "KILLED", "orphaned by a killed driver")
            client.delete_run(run.info.run_id)
    return [run.data.tags.get("ray_trial_id", "") for run in open_runs]
