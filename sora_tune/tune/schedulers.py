"""Pareto-aware early stopping: multi-objective asynchronous successive halving (MO-ASHA,
Schmucker et al. 2021, "Multi-objective Asynchronous Successive Halving").

Rungs sit at `grace_period · reduction_factor^k` epochs below the trials' budget. When a trial
reaches a rung, its objective vector joins the ones recorded there, and all of them are ranked:
first by non-dominated sorting (the front a point is on), then, inside a front, by crowding
distance (points in sparse stretches of the front first, as NSGA-II ranks them). The trial goes
on if it ranks in the best `1/reduction_factor` share of the rung (the best one always does), and
stops otherwise: it is recorded as stopped, not failed (see `outcome`).

Ray Tune neither saves nor restores a scheduler's state when it resumes an experiment, so this
scheduler keeps its rungs itself, in a JSON file in the search's folder, and reads them back
when a resumed search starts it again.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from ..front import crowding_distance, nondominated_ranks
from .state import read_json, write_json

RUNGS_FILE = "sora_tune_rungs.json"


def rung_epochs(grace_period: int, reduction_factor: float, max_epochs: int) -> list[int]:
    """The epochs with a rung: grace_period · reduction_factor^k, below `max_epochs` (a trial
    that reaches its budget has nothing left to stop)."""
    rungs, k = [], 0
    while (epoch := round(grace_period * reduction_factor**k)) < max_epochs:
        if epoch not in rungs:
            rungs.append(epoch)
        k += 1
    return rungs


def promotion_order(values: np.ndarray, directions: list[str]) -> np.ndarray:
    """Row indices from best to worst: by non-dominated front, then by crowding distance inside
    a front (larger first), then by row (earlier first). Rows with NaN come last."""
    ranks = nondominated_ranks(values, directions)
    crowding = np.zeros(len(values))
    for front in np.unique(ranks[np.isfinite(ranks)]):
        members = np.flatnonzero(ranks == front)
        crowding[members] = crowding_distance(values[members], directions)
    return np.lexsort((np.arange(len(values)), -crowding, ranks))


def keeps(position: int, recorded: int, reduction_factor: float) -> bool:
    """Whether the trial at `position` (0 = best) of `recorded` goes on: the best
    ceil(recorded / reduction_factor) do, so the worst 1 - 1/reduction_factor share stops."""
    return position < max(1, math.ceil(recorded / reduction_factor))


class ParetoSuccessiveHalving(FIFOScheduler):
    """MO-ASHA on the objectives `directions` (`{metric: "maximize" | "minimize"}`).

    Args:
        directions: The objectives and their directions, as the searcher gets them.
        max_epochs: The trials' budget in epochs.
        grace_period: Epochs before the first rung.
        reduction_factor: Rung spacing, and the share that goes on at each rung (1/rf).
        state_folder: The search's folder (a path or URI): the rungs are kept there, so that
            `--resume` goes on with them. `None`: in memory only.
        time_attr: The result key counting epochs.
    """

    def __init__(
        self,
        directions: dict[str, str],
        *,
        max_epochs: int,
        grace_period: int = 1,
        reduction_factor: float = 3.0,
        state_folder: str | None = None,
        time_attr: str = "epoch",
    ) -> None:
        super().__init__()
        if grace_period < 1 or reduction_factor <= 1:
            raise ValueError("grace_period must be >= 1 and reduction_factor > 1")
        self.directions = dict(directions)
        self.reduction_factor = reduction_factor
        self.rungs = rung_epochs(grace_period, reduction_factor, max_epochs)
        self.state_folder = state_folder
        self.time_attr = time_attr
        # rung epoch -> {trial id: objective vector}; the decisions taken, for the record
        self.recorded: dict[int, dict[str, list[float]]] = {rung: {} for rung in self.rungs}
        self.stopped: dict[str, int] = {}
        self._loaded = False

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # the objectives are given at construction, all of them

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
        epoch = result.get(self.time_attr)
        if epoch not in self.recorded or any(key not in result for key in self.directions):
            return TrialScheduler.CONTINUE
        self._load()
        rung = self.recorded[epoch]
        rung[trial.trial_id] = [float(result[key]) for key in self.directions]
        decision = self.decide(epoch, trial.trial_id)
        if decision == TrialScheduler.STOP:
            self.stopped[trial.trial_id] = epoch
        self._save()
        return decision

    def decide(self, epoch: int, trial_id: str) -> str:
        """CONTINUE or STOP for `trial_id`, as recorded at the rung at `epoch`."""
        rung = self.recorded[epoch]
        ids = list(rung)
        order = promotion_order(np.array([rung[i] for i in ids]), list(self.directions.values()))
        position = int(np.flatnonzero(order == ids.index(trial_id))[0])
        if keeps(position, len(ids), self.reduction_factor):
            return TrialScheduler.CONTINUE
        return TrialScheduler.STOP

    def _load(self) -> None:
        """Once: the rungs a search that is being resumed recorded before."""
        if self._loaded:
            return
        self._loaded = True
        if self.state_folder is None:
            return
        saved = read_json(self.state_folder, RUNGS_FILE, missing_ok=True)
        if saved:
            for rung, points in saved["recorded"].items():
                self.recorded.setdefault(int(rung), {}).update(points)
            self.stopped.update(saved["stopped"])

    def _save(self) -> None:
        if self.state_folder is not None:
            write_json(
                self.state_folder,
                RUNGS_FILE,
                {"rungs": self.rungs, "recorded": self.recorded, "stopped": self.stopped},
            )

    def debug_string(self) -> str:
        counts = ", ".join(f"epoch {e}: {len(r)}" for e, r in self.recorded.items())
        return f"ParetoSuccessiveHalving: rungs ({counts}), {len(self.stopped)} stopped"
