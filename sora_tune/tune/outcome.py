"""How a trial ended, told the same way to MLflow, Optuna and the user.

- finished: the trial ran its epochs; it ends its own run FINISHED.
- diverged or raised: the trial ends its own run FAILED with the reason.
- stopped: a scheduler stopped it early. Ray stops it between epochs, so the trial leaves its
  run open; `TrialRecorder` ends it FINISHED with the tag `sora_tune.stopped_at_epoch`, and
  `StoppedAsPrunedOptunaSearch` tells Optuna PRUNED, never COMPLETE with the values of a smaller
  budget; a front-tracing trial's completed stages still count among the search's candidates.
- finished with every rank pruned: no adapter to register, so PRUNED for Optuna too.
- lost: its worker died for good; the run ends FAILED, "worker lost".
- killed: the search was interrupted (SIGINT, SIGTERM) while it ran; the run ends KILLED,
  "search interrupted", and `--resume` continues it in the same run.
"""

from __future__ import annotations

import warnings
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


def candidate_points(result: dict[str, Any], directions: dict[str, str]) -> np.ndarray:
    """The points of a finished trial that `pareto` lists as candidates, as an `(n, k)` array of
    the objectives `directions`: every stage point of a front-tracing trial (`STAGE_POINTS_KEY`),
    the last values of any other; never a point pruned to rank 0 (it exported no adapter, so it
    cannot be registered) nor one with NaN."""
    points = result.get(STAGE_POINTS_KEY) or [result]
    values = np.array(
        [
            [p.get(key, np.nan) for key in directions]
            for p in points
            if p.get("nonzero_rank", 1) > 0
        ],
        dtype=float,
    ).reshape(-1, len(directions))
    return values[~np.isnan(values).any(axis=1)]


def told_values(
    points: np.ndarray, directions: dict[str, str], candidates: np.ndarray | None = None
) -> dict[str, float] | None:
    """What Optuna is told of a finished trial with the candidate `points` (`candidate_points`):
    the point by which it moved the search's answer the most, or `None` when it has none (every
    rank pruned: Optuna records it PRUNED, so it is on no front, as it is on none of `pareto`'s).

    With two or more objectives, the answer is `pareto`'s front, measured as `pareto` measures
    it, so that the sampler is rewarded for what the user is shown at the end: the point that adds the most hypervolume to the front of `candidates` (every candidate
    of the trials that ended before, stopped ones' completed stages too), from the reference
    point `pareto` would take (`default_reference` of those and `points`). With one objective
    the answer is the best score, and the trial's best point is told. Ties, such as every point
    dominated by the front, go to the later stage (the smaller adapter)."""
    if len(points) == 0:
        return None
    senses = list(directions.values())
    if len(directions) == 1:
        gains = points[:, 0] if senses[0] == "maximize" else -points[:, 0]
    else:
        front = np.empty((0, len(directions))) if candidates is None else candidates
        reference = default_reference(np.vstack([front, points]), senses)
        base = hypervolume(front, senses, reference) if len(front) else 0.0
        gains = np.array(
            [hypervolume(np.vstack([front, [point]]), senses, reference) - base for point in points]
        )
    best = len(gains) - 1 - int(np.argmax(gains[::-1]))
    return dict(zip(directions, map(float, points[best]), strict=True))


class StoppedAsPrunedOptunaSearch(OptunaSearch):
    """Ray's `OptunaSearch`, told what sora-tune's trials mean: a trial a scheduler stopped
    early is PRUNED (Ray tells it COMPLETE with its last, partial-budget values, which would put
    an under-trained adapter on Optuna's front and steer the sampler with it), so is a trial
    with no point to register (every rank pruned), and any other is told its `told_values`.
    The study names its objectives, so `optuna-dashboard` shows them by name.

    Args:
        directions: The objectives and their directions (`"maximize"`, `"minimize"`).
        **kwargs: The rest of `OptunaSearch`'s arguments (not `metric` and `mode`).

    Attributes:
        candidates: Every candidate point `pareto` will list of the trials ended so far: the
            front and reference `told_values` measures against. Saved with the searcher, so a
            resumed search keeps them.
    """

    def __init__(self, directions: dict[str, str], **kwargs: Any) -> None:
        self.directions = dict(directions)  # before OptunaSearch builds the study (`_setup_study`)
        self.candidates = np.empty((0, len(directions)))
        self._stage_ends: dict[str, dict[int, list[float]]] = {}
        metrics, modes = list(directions), [RAY_MODES[d] for d in directions.values()]
        super().__init__(
            metric=metrics if len(metrics) > 1 else metrics[0],
            mode=modes if len(modes) > 1 else modes[0],
            **kwargs,
        )

    def _setup_study(self, mode: str | list[str]) -> None:
        import optuna

        super()._setup_study(mode)
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2: nothing to act on
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._ot_study.set_metric_names(list(self.directions))

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._note_stage_end(trial_id, result)
        super().on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        ending = outcome(result, error)
        if ending == "stopped":
            # Ray passes the report that stopped it here only, not to `on_trial_result`. Its
            # completed stages are candidates of `pareto` (the same points a trial that went on
            # has), so they join the front later trials are measured against.
            self._note_stage_end(trial_id, result)
            ended = list(self._stage_ends.pop(trial_id, {}).values())
            ended_points = np.array(ended, dtype=float).reshape(-1, len(self.directions))
            self.candidates = np.vstack([self.candidates, ended_points])
            result = None  # with no result and no error, Ray's OptunaSearch tells PRUNED
        elif ending == "finished":
            points = candidate_points(result, self.directions)
            told = told_values(points, self.directions, self.candidates)
            self.candidates = np.vstack([self.candidates, points])
            result = None if told is None else result | told
        self._stage_ends.pop(trial_id, None)
        super().on_trial_complete(trial_id, result, error)

    def _note_stage_end(self, trial_id: str, result: dict[str, Any]) -> None:
        """Keep a front-tracing trial's stage point, if `result` ends a stage and has an adapter."""
        if result.get("stage_end") and result.get("nonzero_rank", 0) > 0:
            point = [float(result[key]) for key in self.directions]
            if not np.isnan(point).any():
                self._stage_ends.setdefault(trial_id, {})[result["stage"]] = point


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
