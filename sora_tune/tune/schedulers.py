"""Pareto-aware early stopping: multi-objective asynchronous successive halving (MO-ASHA,
Schmucker et al. 2021), with the rule the MO-ASHA papers and syne-tune's docstrings describe.

Rungs sit at `grace_period · reduction_factor^k` epochs below the trials' budget. The first
trial to reach a rung goes on. A later one is ranked among every trial recorded at that rung,
itself included: first by non-dominated sorting (the front a point is on), then, inside a
front, in ε-net order (Salinas et al. 2021: best score first, then farthest-first on the scaled
objectives), which depends on the points' values, not on the order they arrived. It goes on when
its position (0 = best) divided by the number recorded is at most `1/reduction_factor`, and stops
otherwise: it is recorded as stopped, not failed (see `outcome`).

syne-tune 0.16's code (`MOASHA` with `NonDominatedPriority`) does not follow its own docstrings,
and this module deviates from it on purpose:
- Its `nondominated_sort` returns an order (row indices, best first), and `MOASHA` reads that
  array as each row's priority; inside a front, its ε-net returns each row's rank, which is then
  indexed with as if it were an order. A newcomer's "priority" is thus the index of some other
  row, and it can be stopped though it dominates every earlier trial. Here a trial's own
  position in the order decides, as the papers say.
- Its ε-net measures distances on raw values, so retained_params (hundreds of thousands)
  outweighs val_score (at most 1) and the spread is one of sizes only. Here each objective is
  min-max scaled over the front first, so both count (`front.epsilon_net_order`).
- Its ties (the first point, the farthest one) go to the earlier arrival; here to the better
  values, and a copy of a recorded point takes that point's position, so no decision depends
  on the order trials arrived in.
The tests pin this rule's decisions on small rungs worked out by hand.

Baselines (LoRA, AdaLoRA) are never ranked. A front-tracing trial is recorded at a rung only at
the end of a stage (`COMPARABLE_KEY` in its reports): at the first stage end at or after the
rung, so that its point is compared at a stage's end, pruned, not in the middle of its dense
phase where `retained_params` is only r_max's.

Ray Tune neither saves nor restores a scheduler's state when it resumes an experiment, so this
scheduler keeps its rungs itself, in a JSON file in the search's folder, and reads them back
when a resumed search starts it again.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from ..front import epsilon_net_order, nondominated_ranks
from .state import read_json, write_json
from .trial import COMPARABLE_KEY

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
    """Row indices from best to worst: by non-dominated front, then in ε-net order inside a
    front (`front.epsilon_net_order`). Rows with NaN come last."""
    ranks = nondominated_ranks(values, directions)
    order = [
        members[epsilon_net_order(values[members], directions)]
        for front in np.unique(ranks[np.isfinite(ranks)])
        for members in [np.flatnonzero(ranks == front)]
    ]
    return np.concatenate([*order, np.flatnonzero(~np.isfinite(ranks))]).astype(int)


def position_of(row: int, values: np.ndarray, directions: list[str]) -> int:
    """The position (0 = best) of `row` in `promotion_order`; a row equal to others takes the
    best position among them, so a newcomer never ranks behind its own copy."""
    positions = np.argsort(promotion_order(values, directions))
    own = values[row]
    same = np.all((values == own) | (np.isnan(values) & np.isnan(own)), axis=1)
    return int(positions[same].min())


def keeps(position: int, recorded: int, reduction_factor: float) -> bool:
    """Whether the trial at `position` (0 = best) among the `recorded` at its rung goes on:
    MO-ASHA's rule, position / recorded <= 1 / reduction_factor. The first trial at a rung
    (position 0 of 1) always does."""
    return position / recorded <= 1 / reduction_factor


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
        self.stopped: dict[str, float] = {}
        self._loaded = False

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # the objectives are given at construction, all of them

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
        if (
            getattr(trial, "config", {}).get("method", "sora") != "sora"  # a baseline
            or not result.get(COMPARABLE_KEY, True)
            # A diverged trial's last report has no epoch: as Ray's own schedulers do when
            # `time_attr` is missing, let it end on its own.
            or any(key not in result for key in [self.time_attr, *self.directions])
        ):
            return TrialScheduler.CONTINUE
        self._load()
        rung = self.rung_reached(trial.trial_id, result[self.time_attr])
        if rung is None:
            return TrialScheduler.CONTINUE
        self.recorded[rung][trial.trial_id] = [float(result[key]) for key in self.directions]
        decision = self.decide(rung, trial.trial_id)
        if decision == TrialScheduler.STOP:
            self.stopped[trial.trial_id] = result[self.time_attr]
        self._save()
        return decision

    def rung_reached(self, trial_id: str, epoch: int) -> int | None:
        """The highest rung at or below `epoch`, unless the trial is recorded there already (a
        trial that reports every epoch meets each rung at its epoch; a front-tracing trial at
        the first stage end after it)."""
        reached = [rung for rung in self.recorded if rung <= epoch]
        if not reached or trial_id in self.recorded[max(reached)]:
            return None
        return max(reached)

    def decide(self, epoch: int, trial_id: str) -> str:
        """CONTINUE or STOP for `trial_id`, as recorded at the rung at `epoch`."""
        rung = self.recorded[epoch]
        ids = list(rung)
        values = np.array([rung[i] for i in ids])
        position = position_of(ids.index(trial_id), values, list(self.directions.values()))
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
