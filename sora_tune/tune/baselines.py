"""The LoRA ladder beside a SoRA search (`--baseline lora-ladder`): LoRA trials of rank 1, 2, 4, …
up to the space's largest r_max, at the settings of the space's first point, so that `pareto`
and the end of the search can answer a user's first question: on this task, does SoRA buy a
smaller adapter than a plain LoRA of lower rank?

The ladder's trials run in the same Ray experiment and MLflow parent run as the search, first,
handed out by `BaselinesFirst` ahead of the sampler's. Optuna never hears of them, Pareto early
stopping never ranks them, and `register` never chooses them (their method is `lora`).
"""

from __future__ import annotations

from typing import Any

from ray.tune.search import Searcher

from .space import SearchSpace

LORA_LADDER = "lora-ladder"


def ladder_ranks(largest: int) -> list[int]:
    """1, 2, 4, … below `largest`, and `largest` itself."""
    ranks = [2**k for k in range(largest.bit_length()) if 2**k < largest]
    return [*ranks, largest]


def ladder_trials(space: SearchSpace, seeds: int) -> list[dict[str, Any]]:
    """The ladder's trial settings: the space's first point (its first `points_to_evaluate`
    entry over `representative()`) with every searched setting given, as LoRA at every rank of
    `ladder_ranks` up to the largest r_max the space can draw, with `seeds` seeds from the
    point's. The ξ settings stay as they are (the LoRA gate is fixed, so they act only through
    the learning-rate schedule, which then restarts at the same stages as SoRA's)."""
    point = space.representative() | (space.points_to_evaluate or [{}])[0]
    spec = space.distributions.get("r_max", {})
    largest = int(spec["high"]) if "high" in spec else max(space.values("r_max"))
    seed = int(point.get("seed", 0))
    return [
        point | {"method": "lora", "r_max": rank, "seed": seed + s}
        for rank in ladder_ranks(largest)
        for s in range(seeds)
    ]


class BaselinesFirst(Searcher):
    """Hands out `baselines` (complete trial settings) first, then what `searcher` suggests; the
    baselines' results never reach `searcher`. A wrapper as Ray's `ConcurrencyLimiter` is: Ray
    saves and restores its state with the search's, so a resumed search neither repeats nor
    forgets a baseline."""

    def __init__(self, searcher: Searcher, baselines: list[dict[str, Any]]) -> None:
        self.searcher = searcher
        self.pending = list(baselines)
        self.baseline_trials: set[str] = set()
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.pending:
            self.baseline_trials.add(trial_id)
            return self.pending.pop(0)
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id not in self.baseline_trials:
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if trial_id not in self.baseline_trials:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)

    # Ray saves a wrapper's state with `get_state` and the innermost searcher's with `save`.
    def get_state(self) -> dict[str, Any]:
        return {"pending": list(self.pending), "baseline_trials": set(self.baseline_trials)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.pending, self.baseline_trials = state["pending"], state["baseline_trials"]

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)
