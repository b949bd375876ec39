"""A replay of searches on a simulated clock, through the search's real scheduler and searcher
(issue #28 §3), as syne-tune's simulator backend replays recorded learning curves.

Ray Tune has no simulator, but what decides a search is a handful of plain calls, and `replay`
makes them in the order `TuneController` makes them (ray/tune/execution/tune_controller.py):

1. while fewer than `max_concurrent` trials are pending, `suggest` a trial (the
   `ConcurrencyLimiter` returns `None` once `workers` trials are live) and `on_trial_add` it;
2. start the trials `choose_trial_to_run` names while a worker is free;
3. take the next report in simulated time: `scheduler.on_trial_result`, then, unless it said
   STOP, `searcher.on_trial_result`; a trial that is stopped, or has made its last report, gets
   `scheduler.on_trial_complete` and then `searcher.on_trial_complete`, both with its last
   result. (A function trainable that returns reports its last result once more with `done`,
   which `Trial.should_stop` turns into STOP before any scheduler or searcher sees it.)

Real: `ParetoSuccessiveHalving`, `StoppedAsPrunedOptunaSearch` (Ray's `OptunaSearch`) with
`make_sampler`'s samplers, Ray's `ConcurrencyLimiter` and `FIFOScheduler`. Simulated: the
controller (workers and a clock, no actors, no start-up latency) and the trials, each looked up
in the table of recorded learning curves (`sora_tune.curves`):

- **Lookup.** A suggestion is continuous; the table holds a Latin hypercube of configurations.
  The trial is the recorded configuration nearest to it in the design's unit cube
  (`curves.to_unit`, `from_unit`'s inverse), among those with the same choices (r_max): a
  choice has no distance. Sampling over the recorded configurations instead would make the
  space categorical, and TPE's kernels over categories know no neighbours: it would no longer
  be the sampler a search runs. The cost is a response surface that is constant on each
  configuration's Voronoi cell, as fine as the design and no finer.
- **Seeds.** Which recorded seed a trial gets is drawn from a hash of the replay's seed and the
  suggested setting (`seed_for`): the same in every arm that suggests the same setting, and
  computable by a real trainable from its own config (the validation test does).
- **Clock.** The recorded intervals were measured on a machine shared with other jobs (one
  interval took 247 s against a median of 10 s). `Clock.fit` takes, for each evaluation, the
  median interval over the trials with the same adapter width (`COST_PARAMETERS`: learning rate
  and ξ change the numbers, not the work), plus a median set-up and a median cost per post-hoc
  threshold point. `Clock.own` replays each trial's own measured intervals, noise and all.
- **Front-tracing.** A trace trial is replayed as the search runs it by default (the `trace`
  space's `threshold_quantiles`, §4's option (b)): the constant trial it trains as, then its
  post-hoc gate-threshold points on the final model (recorded as `thresholds` of the last
  evaluation), each costing one evaluation, reported as the trial's stage points; it is
  comparable at every rung, as the constant trial it is until its end. Stages trained on
  (option (a)) were recorded for a few trials only, to compare the two (`compare_tracing`).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter

from ..curves import read_table, to_unit
from ..front import OBJECTIVES, default_reference, hypervolume, is_pareto_front
from .config import Sampler
from .outcome import StoppedAsPrunedOptunaSearch, candidate_points
from .schedulers import ParetoSuccessiveHalving
from .search import make_sampler
from .space import SearchSpace
from .trial import BUDGET_KEY, COMPARABLE_KEY, STAGE_POINTS_KEY

# The searched settings that change how long a step takes: the adapter's width. The learning
# rate and ξ change what a step computes, not how much.
COST_PARAMETERS = ("r_max",)
DIRECTIONS = tuple(OBJECTIVES.values())


@dataclass(frozen=True)
class Arm:
    """A kind of search: its sampler, Pareto early stopping, front-tracing trials."""

    sampler: Sampler
    early_stop: bool = False
    trace: bool = False


ARMS = {
    "random": Arm("random"),
    "tpe": Arm("tpe"),
    "tpe+pareto": Arm("tpe", early_stop=True),
    "tpe+trace": Arm("tpe", trace=True),
    "tpe+both": Arm("tpe", early_stop=True, trace=True),
}


class RecordedTable:
    """The finished trials of a recorded table, looked up by a suggested setting.

    Args:
        design: The table's design (its first line's `design`).
        lines: Its trials.

    Raises:
        ValueError: no finished trial.
    """

    def __init__(self, design: dict[str, Any], lines: Sequence[dict[str, Any]]) -> None:
        self.distributions: dict[str, dict[str, Any]] = design["space"]["distributions"]
        self.fixed: dict[str, Any] = design["space"]["fixed"]
        self.trials = {(ln["config"], ln["seed"]): ln for ln in lines if ln["status"] == "finished"}
        if not self.trials:
            raise ValueError("the table holds no finished trial to replay")
        self.configs = sorted({config for config, _ in self.trials})
        self.seeds = {
            c: sorted(s for config, s in self.trials if config == c) for c in self.configs
        }
        self.params = [self.trials[(c, self.seeds[c][0])]["params"] for c in self.configs]
        names = sorted(self.distributions)
        self.choices = [n for n in names if self.distributions[n]["type"] == "choice"]
        self.numbers = [n for n in names if n not in self.choices]
        self.units = np.array(
            [[to_unit(self.distributions[n], p[n]) for n in self.numbers] for p in self.params]
        ).reshape(len(self.configs), len(self.numbers))

    @classmethod
    def read(cls, path: str | os.PathLike) -> RecordedTable:
        first, lines = read_table(path)
        if first is None:
            raise ValueError(f"{path} is not a recorded table (no design line)")
        return cls(first["design"], lines)

    def space(self) -> SearchSpace:
        """The recorded search space: what the searcher samples from."""
        return SearchSpace(dict(self.distributions), dict(self.fixed))

    def nearest(self, params: dict[str, Any]) -> int:
        """The recorded configuration nearest to `params` in the unit cube, among those with the
        same choices; ties go to the lower index.

        Raises:
            ValueError: no recorded configuration has these choices.
        """
        same = [
            i
            for i, p in enumerate(self.params)
            if all(p[name] == params[name] for name in self.choices)
        ]
        if not same:
            chosen = {name: params[name] for name in self.choices}
            raise ValueError(f"no recorded configuration has {chosen}")
        point = np.array([to_unit(self.distributions[n], params[n]) for n in self.numbers])
        distance = np.linalg.norm(self.units[same] - point, axis=1)
        return self.configs[same[int(np.argmin(distance))]]

    def seed_for(self, config: int, params: dict[str, Any], replay_seed: int) -> int:
        """The recorded seed of `config` that a trial suggested `params` in replay `replay_seed`
        gets: a hash of both, so every arm draws the same for the same suggestion."""
        key = json.dumps([replay_seed, {n: params[n] for n in sorted(self.distributions)}])
        draw = int(hashlib.sha256(key.encode()).hexdigest()[:12], 16)
        return self.seeds[config][draw % len(self.seeds[config])]

    def lookup(self, params: dict[str, Any], replay_seed: int) -> dict[str, Any]:
        """The recorded trial that a trial suggested `params` replays."""
        config = self.nearest(params)
        return self.trials[(config, self.seed_for(config, params, replay_seed))]

    def reference(self) -> tuple[float, ...]:
        """The search's reference point (`front.default_reference`) over every point a replay
        can produce: val_score 0 and 1.1 × the largest retained_params. One for every arm."""
        points = np.vstack([trace_points(line) for line in self.trials.values()])
        return default_reference(points, DIRECTIONS)


def trace_points(line: dict[str, Any]) -> np.ndarray:
    """`(n, 2)` objectives of a recorded trial's last evaluation and of its post-hoc threshold
    points there: what a front-tracing trial replayed as option (b) yields."""
    last = line["evaluations"][-1]
    points = [last, *last.get("thresholds", [])]
    return np.array([[p[key] for key in OBJECTIVES] for p in points], dtype=float)


@dataclass(frozen=True)
class Clock:
    """Simulated seconds of a trial's parts.

    Attributes:
        evaluations: Seconds of each interval (training since the evaluation before, and
            scoring) by the trial's `COST_PARAMETERS` (`cost_key`); empty: every trial takes its
            own recorded intervals.
        setup_s: Before the first interval: the trial's set-up.
        threshold_point_s: One post-hoc threshold point: one evaluation.
    """

    evaluations: dict[str, tuple[float, ...]]
    setup_s: float
    threshold_point_s: float

    @classmethod
    def fit(cls, lines: Sequence[dict[str, Any]]) -> Clock:
        """Medians over the recorded trials, robust to the load other jobs put on the machine:
        each interval's by cost key, the set-up (wall time less intervals and thresholds), and a
        threshold point's (a trial's threshold time over its points)."""
        by_key: dict[str, list[list[float]]] = {}
        for line in lines:
            by_key.setdefault(cost_key(line["params"]), []).append(
                [e["interval_s"] for e in line["evaluations"]]
            )
        evaluations = {
            key: tuple(float(np.median([row[i] for row in rows])) for i in range(len(rows[0])))
            for key, rows in by_key.items()
        }
        return cls(evaluations, *_overheads(lines))

    @classmethod
    def own(cls, lines: Sequence[dict[str, Any]]) -> Clock:
        """Every trial takes its own recorded intervals; set-up and threshold points as `fit`."""
        return cls({}, *_overheads(lines))

    def durations(self, line: dict[str, Any], *, trace: bool) -> list[float]:
        """Simulated seconds from a trial's start to its first report, then between reports;
        the last includes the threshold points of a front-tracing trial."""
        if self.evaluations:
            seconds = list(self.evaluations[cost_key(line["params"])])
        else:
            seconds = [e["interval_s"] for e in line["evaluations"]]
        seconds[0] += self.setup_s
        if trace:
            seconds[-1] += self.threshold_point_s * len(
                line["evaluations"][-1].get("thresholds", [])
            )
        return seconds


def cost_key(params: dict[str, Any]) -> str:
    """The `COST_PARAMETERS` of a trial, as a key of `Clock.evaluations`."""
    return ",".join(f"{name}={params[name]}" for name in COST_PARAMETERS)


def _overheads(lines: Sequence[dict[str, Any]]) -> tuple[float, float]:
    setup = [
        ln["wall_s"] - sum(e["interval_s"] for e in ln["evaluations"]) - ln["threshold_s"]
        for ln in lines
    ]
    counts = [sum(len(e.get("thresholds", [])) for e in ln["evaluations"]) for ln in lines]
    per_point = [ln["threshold_s"] / n for ln, n in zip(lines, counts, strict=True) if n]
    return float(np.median(setup)), float(np.median(per_point)) if per_point else 0.0


def trial_reports(line: dict[str, Any], *, trace: bool) -> list[dict[str, Any]]:
    """The results a recorded trial reports, keyed as `run_trial` reports them. The table keeps
    retained_params, which is 0 exactly when no rank is left: `nonzero_rank` is only read as
    zero or not (`outcome.candidate_points`). A front-tracing trial's last result carries its
    stage points: the constant trial's point, then its threshold points."""
    epochs = line["evaluations"][-1]["epoch"]
    reports = [
        {key: e[key] for key in ("epoch", "step", "val_score", "retained_params", "test_score")}
        | {
            "nonzero_rank": int(e["retained_params"] > 0),
            "stage": 0,
            "stage_end": False,
            BUDGET_KEY: epochs,
            COMPARABLE_KEY: True,
            "status": "finished",
        }
        for e in line["evaluations"]
    ]
    if trace:
        reports[-1][STAGE_POINTS_KEY] = [
            {"stage": stage, "nonzero_rank": int(point[1] > 0)}
            | dict(zip(OBJECTIVES, map(float, point), strict=True))
            for stage, point in enumerate(trace_points(line))
        ]
    return reports


@dataclass(eq=False)
class ReplayTrial:
    """A trial as Ray's schedulers see one (`trial_id`, `config`, `status`), and its replay."""

    trial_id: str
    config: dict[str, Any]
    line: dict[str, Any]
    reports: list[dict[str, Any]]
    durations: list[float]
    status: str = Trial.PENDING
    started: float | None = None
    ended: float | None = None
    last_result: dict[str, Any] = field(default_factory=dict)
    decisions: list[str] = field(default_factory=list)  # the scheduler's, one per report


class _Controller:
    """What schedulers read of `TuneController`: its trials, in the order they were added."""

    def __init__(self) -> None:
        self.trials: list[ReplayTrial] = []

    def get_trials(self) -> list[ReplayTrial]:
        return self.trials


@dataclass
class Replay:
    """One replayed search.

    Attributes:
        trials: Every trial, in the order it was suggested.
        end_s: Simulated time when the search ended (the last trial ended, or the budget).
        cut: Trials in flight when the time budget ran out.
    """

    trials: list[ReplayTrial]
    end_s: float
    cut: int

    def ended(self) -> list[ReplayTrial]:
        """The trials that ended, in the order they did."""
        return sorted((t for t in self.trials if t.ended is not None), key=lambda t: t.ended)

    def points(self, trial: ReplayTrial) -> np.ndarray:
        """A trial's candidates, as `pareto` lists them: the points of a finished trial."""
        if trial.ended is None or stopped(trial):
            return np.empty((0, len(OBJECTIVES)))
        return candidate_points(trial.last_result, OBJECTIVES)

    def compute_s(self) -> float:
        """Simulated trial-seconds spent, stopped and cut trials included."""
        return sum(
            (self.end_s if t.ended is None else t.ended) - t.started
            for t in self.trials
            if t.started is not None
        )

    def curve(self, reference: Sequence[float]) -> list[tuple[float, float]]:
        """(time, hypervolume of the candidates known), each time the hypervolume grew."""
        front = np.empty((0, len(OBJECTIVES)))
        curve: list[tuple[float, float]] = []
        for trial in self.ended():
            points = self.points(trial)
            if not len(points):
                continue
            front = np.vstack([front, points])
            front = front[is_pareto_front(front, DIRECTIONS)]
            volume = hypervolume(front, DIRECTIONS, reference)
            if not curve or volume > curve[-1][1]:
                curve.append((float(trial.ended), volume))
        return curve


def stopped(trial: ReplayTrial) -> bool:
    return TrialScheduler.STOP in trial.decisions


def replay(
    table: RecordedTable,
    clock: Clock,
    arm: Arm,
    *,
    seed: int,
    workers: int,
    num_samples: int,
    sampler_samples: int | None = None,
    time_budget_s: float | None = None,
    grace_period: int = 1,
    reduction_factor: float = 3.0,
    scheduler: TrialScheduler | None = None,
) -> Replay:
    """Replay one search of `arm` on `workers` workers (see the module's docstring).

    Args:
        table, clock: The recorded trials and their simulated durations.
        arm: Sampler, early stopping, front-tracing.
        seed: The sampler's seed, and the draw of recorded seeds (`RecordedTable.seed_for`).
        workers: Trials at once (the `ConcurrencyLimiter`'s `max_concurrent`).
        num_samples: Trials at most (Ray's `num_samples`).
        sampler_samples: The search size the sampler is sized for (`make_sampler`); default
            `num_samples`.
        time_budget_s: Simulated seconds after which the search ends, trials in flight cut.
        grace_period, reduction_factor: Of Pareto early stopping, as `SearchConfig`'s.
        scheduler: Replay this scheduler instead of the arm's (a new one: it keeps rungs).
    """
    space = table.space()
    optuna_search = StoppedAsPrunedOptunaSearch(
        dict(OBJECTIVES),
        sampler=make_sampler(arm.sampler, seed, num_samples=sampler_samples or num_samples),
    )
    searcher = ConcurrencyLimiter(optuna_search, max_concurrent=workers)
    searcher.set_search_properties(None, None, space.to_tune())  # as `tune.run` does
    scheduler = scheduler or (
        ParetoSuccessiveHalving(
            dict(OBJECTIVES),
            max_epochs=space.largest("epochs"),
            grace_period=grace_period,
            reduction_factor=reduction_factor,
        )
        if arm.early_stop
        else FIFOScheduler()
    )
    controller = _Controller()
    events: list[tuple[float, int, int, ReplayTrial]] = []  # (time, order, report, trial)
    order = 0
    now = 0.0

    def after(trial: ReplayTrial, index: int) -> None:
        nonlocal order
        heapq.heappush(events, (now + trial.durations[index], order, index, trial))
        order += 1

    def complete(trial: ReplayTrial) -> None:
        scheduler.on_trial_complete(controller, trial, trial.last_result)
        searcher.on_trial_complete(trial.trial_id, result=trial.last_result)
        trial.status, trial.ended = Trial.TERMINATED, now

    def report(trial: ReplayTrial, result: dict[str, Any]) -> str:
        result = result | {"trial_id": trial.trial_id, "time_total_s": now - trial.started}
        decision = scheduler.on_trial_result(controller, trial, result)
        if decision != TrialScheduler.STOP:
            searcher.on_trial_result(trial.trial_id, result)
        trial.last_result = result
        trial.decisions.append(decision)
        return decision

    while True:
        pending = [t for t in controller.trials if t.status == Trial.PENDING]
        while len(pending) < workers and len(controller.trials) < num_samples:
            trial_id = f"replay_{len(controller.trials):05d}"
            params = searcher.suggest(trial_id)
            if params is None:  # the limiter: `workers` trials are live
                break
            line = table.lookup(params, seed)
            trial = ReplayTrial(
                trial_id,
                table.fixed | params,
                line,
                trial_reports(line, trace=arm.trace),
                clock.durations(line, trace=arm.trace),
            )
            controller.trials.append(trial)
            scheduler.on_trial_add(controller, trial)
            pending.append(trial)
        running = sum(t.status == Trial.RUNNING for t in controller.trials)
        while running < workers and (chosen := scheduler.choose_trial_to_run(controller)):
            chosen.status, chosen.started = Trial.RUNNING, now
            after(chosen, 0)
            running += 1
        if not events or (time_budget_s is not None and events[0][0] > time_budget_s):
            break
        now, _, index, trial = heapq.heappop(events)
        decision = report(trial, trial.reports[index])
        if decision == TrialScheduler.STOP or index == len(trial.reports) - 1:
            complete(trial)
        else:
            after(trial, index + 1)
    if time_budget_s is not None and events:
        now = time_budget_s
    return Replay(controller.trials, now, cut=len(events))


def hypervolume_at(curve: Sequence[Sequence[float]], time_s: float) -> float:
    """The hypervolume a search's `curve` had reached at `time_s` (0 before its first point)."""
    return max((hv for t, hv in curve if t <= time_s * (1 + 1e-9)), default=0.0)


def time_to_reach(curve: Sequence[Sequence[float]], target: float) -> float | None:
    """When the hypervolume first reached `target` (to a relative 1e-9), or `None`."""
    return next((t for t, hv in curve if hv >= target * (1 - 1e-9)), None)


def bootstrap_band(
    values: np.ndarray, *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mean over rows (seeds) of `values` `(seeds, points)` and a percentile bootstrap
    band of that mean, resampling seeds."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    means = values[picks].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return values.mean(axis=0), *np.percentile(means, [tail, 100 - tail], axis=0)


def wilcoxon(first: Sequence[float], second: Sequence[float]) -> float | None:
    """The two-sided p-value of Wilcoxon's signed-rank test on paired values; `None` when every
    pair is equal (no test to make) or there are fewer than 2 pairs."""
    from scipy.stats import wilcoxon as signed_rank

    differences = np.asarray(first, dtype=float) - np.asarray(second, dtype=float)
    if len(differences) < 2 or not np.any(differences):
        return None
    p = float(signed_rank(differences).pvalue)
    return None if math.isnan(p) else p


def summarize(lines: Sequence[dict[str, Any]], *, baseline: str = "random") -> dict[str, Any]:
    """What the replayed searches say, per (budget, workers) setting and arm, on the seeds the
    baseline ran (an arm not yet replayed on some is read on those it has):

    - `hv_at_budget`: the hypervolume at the baseline's end on the same seed (its time budget);
    - `time_share`: when the hypervolume first reached the baseline's final one, as a share of
      the baseline's time (`None`: never), and `within_third`, on how many seeds it is ≤ 1/3;
    - `points_per_trial_hour`: candidates over the summed simulated trial time;
    - `wilcoxon`: p-values of `hv_at_budget` and of `time_share` (never: infinite), paired by
      seed, against the baseline and against `tpe`.

    Args:
        lines: One per replayed search: `arm`, `budget`, `workers`, `seed`, `end_s`,
            `compute_s`, `points`, `curve`.
    """
    settings: dict[str, Any] = {}
    for budget, workers in sorted({(ln["budget"], ln["workers"]) for ln in lines}):
        group = {
            (ln["arm"], ln["seed"]): ln
            for ln in lines
            if (ln["budget"], ln["workers"]) == (budget, workers)
        }
        arms = list(dict.fromkeys(arm for arm, _ in group))
        seeds = sorted(seed for arm, seed in group if arm == baseline)
        if not seeds:
            continue
        per_arm = {}
        for arm in arms:
            rows = []
            for seed in (s for s in seeds if (arm, s) in group):
                line, base = group[(arm, seed)], group[(baseline, seed)]
                reached = time_to_reach(line["curve"], base["curve"][-1][1])
                rows.append(
                    {
                        "seed": seed,
                        "hv_at_budget": hypervolume_at(line["curve"], base["end_s"]),
                        "time_share": None if reached is None else reached / base["end_s"],
                        "points_per_trial_hour": line["points"] / (line["compute_s"] / 3600),
                        "trials": line["trials"],
                        "stopped": line["stopped"],
                    }
                )
            shares = [r["time_share"] for r in rows]
            per_arm[arm] = {
                "seeds": len(rows),
                "hv_at_budget": float(np.mean([r["hv_at_budget"] for r in rows])),
                "time_shares": shares,
                "median_time_share": float(
                    np.median([math.inf if s is None else s for s in shares])
                ),
                "within_third": sum(s is not None and s <= 1 / 3 for s in shares),
                "points_per_trial_hour": float(np.mean([r["points_per_trial_hour"] for r in rows])),
                "trials": float(np.mean([r["trials"] for r in rows])),
                "stopped": float(np.mean([r["stopped"] for r in rows])),
                "rows": rows,
            }
        for arm, entry in per_arm.items():
            entry["wilcoxon"] = {
                other: {
                    key: wilcoxon(*(_paired(per_arm, arm, other, key)))
                    for key in ("hv_at_budget", "time_share")
                }
                for other in (baseline, "tpe")
                if other in per_arm and other != arm
            }
        settings[f"{budget}|{workers}"] = {
            "budget": budget,
            "workers": workers,
            "seeds": seeds,
            "time_budget_s": float(np.mean([group[(baseline, s)]["end_s"] for s in seeds])),
            "arms": per_arm,
        }
    return settings


def _paired(per_arm: dict[str, Any], arm: str, other: str, key: str) -> tuple[list, list]:
    """The values of `key` of two arms on the seeds both ran; a time never reached counts as
    larger than any reached, which is all a signed-rank test reads of it (never for both: a
    tie)."""
    values = [
        {r["seed"]: math.inf if r[key] is None else r[key] for r in per_arm[name]["rows"]}
        for name in (arm, other)
    ]
    seeds = sorted(set(values[0]) & set(values[1]))
    finite = [v for side in values for v in side.values() if math.isfinite(v)]
    big = 10 * max(map(abs, finite), default=1.0)
    return tuple([big if side[s] == math.inf else side[s] for s in seeds] for side in values)


def goals(setting: dict[str, Any]) -> dict[str, Any]:
    """Issue #28's goals on one (budget, workers) setting of `summarize`:

    - `within_third`: each arm reaches the baseline's final hypervolume with at most a third of
      its time on at least 80% of the seeds (24 of 30);
    - `trace_points`: front-tracing gives at least 5× the candidate points per trial-hour of
      the same search without it, at an equal or better hypervolume at the budget.
    """
    arms = setting["arms"]
    result: dict[str, Any] = {"within_third": {}, "trace_points": {}}
    for arm, entry in arms.items():
        if arm != "random":
            needed = math.ceil(0.8 * entry["seeds"])
            result["within_third"][arm] = {
                "seeds": entry["within_third"],
                "needed": needed,
                "met": entry["within_third"] >= needed,
            }
    for trace, plain in (("tpe+trace", "tpe"), ("tpe+both", "tpe+pareto")):
        if trace in arms and plain in arms:
            ratio = arms[trace]["points_per_trial_hour"] / arms[plain]["points_per_trial_hour"]
            hv_trace, hv_plain = arms[trace]["hv_at_budget"], arms[plain]["hv_at_budget"]
            result["trace_points"][f"{trace} vs {plain}"] = {
                "ratio": ratio,
                "hv": hv_trace,
                "hv_without": hv_plain,
                "met": ratio >= 5 and hv_trace >= hv_plain,
            }
    return result


def compare_tracing(
    constant: Sequence[dict[str, Any]],
    staged: Sequence[dict[str, Any]],
    *,
    stage_steps: int,
    stages: int,
) -> dict[str, Any]:
    """§4's two ways for a front-tracing trial to go on after the constant trial it trains as,
    paired by configuration and seed on the recorded tables:

    - (a) `staged`: stages trained on with the learning rate continuing
      (`curves.STAGED`: `stages` more points, every `stage_steps` steps after the dense phase);
    - (b) `constant`: post-hoc gate thresholds of the finished constant trial.

    Points with no rank left are not candidates (they have no adapter). The cost of both is the
    constant trial's plus what each adds: (a) `stages × stage_steps` steps and `stages`
    evaluations, (b) one evaluation a threshold point. Its clock comes from the constant trials'
    medians, as the replay's does (`Clock.fit`), robust to the load other jobs put on the
    machine: an evaluation costs a threshold point's time, a step the rest of a median interval
    over its steps. Hypervolumes share one reference (`default_reference` of every point of
    both).
    """
    by_trial = {(ln["config"], ln["seed"]): ln for ln in constant if ln["status"] == "finished"}
    pairs = [
        (by_trial[(ln["config"], ln["seed"])], ln)
        for ln in staged
        if ln["status"] == "finished" and (ln["config"], ln["seed"]) in by_trial
    ]
    if not pairs:
        raise ValueError("no trial of the staged table has its constant trial recorded")
    finished = list(by_trial.values())
    per_evaluation = Clock.fit(finished).threshold_point_s
    interval_steps = finished[0]["evaluations"][0]["step"]  # the first interval's steps
    interval_s = float(np.median([e["interval_s"] for ln in finished for e in ln["evaluations"]]))
    per_step = (interval_s - per_evaluation) / interval_steps

    def kept(points: list[dict[str, Any]]) -> np.ndarray:
        rows = [[p[key] for key in OBJECTIVES] for p in points if p["retained_params"] > 0]
        return np.array(rows, dtype=float).reshape(-1, len(OBJECTIVES))

    rows = []
    for line, staged_line in pairs:
        last = line["evaluations"][-1]
        dense = last["step"]
        ends = {dense + k * stage_steps for k in range(stages + 1)}
        trained = dense * per_step + len(line["evaluations"]) * per_evaluation
        thresholds = last.get("thresholds", [])
        rows.append(
            {
                "config": line["config"],
                "seed": line["seed"],
                "thresholds": kept([last, *thresholds]),
                "stages": kept([e for e in staged_line["evaluations"] if e["step"] in ends]),
                "thresholds_s": trained + len(thresholds) * per_evaluation,
                "stages_s": trained + stages * (stage_steps * per_step + per_evaluation),
                "constant_val_score": last["val_score"],
                "dense_val_score": next(
                    e["val_score"] for e in staged_line["evaluations"] if e["step"] == dense
                ),
            }
        )
    reference = default_reference(
        np.vstack([r[way] for r in rows for way in ("thresholds", "stages")]), DIRECTIONS
    )
    ways: dict[str, Any] = {}
    for way in ("thresholds", "stages"):
        hv = [hypervolume(r[way], DIRECTIONS, reference) for r in rows]
        cost_h = [r[f"{way}_s"] / 3600 for r in rows]
        pooled = hypervolume(np.vstack([r[way] for r in rows]), DIRECTIONS, reference)
        ways[way] = {
            "points": int(sum(len(r[way]) for r in rows)),
            "trial_hours": float(sum(cost_h)),
            "pooled_hypervolume": pooled,
            "pooled_hypervolume_per_trial_hour": pooled / sum(cost_h),
            "hypervolume": hv,
            "hypervolume_per_trial_hour": [h / c for h, c in zip(hv, cost_h, strict=True)],
            "points_per_trial_hour": sum(len(r[way]) for r in rows) / sum(cost_h),
        }
    better = max(ways, key=lambda way: ways[way]["pooled_hypervolume_per_trial_hour"])
    return {
        "pairs": [{"config": r["config"], "seed": r["seed"]} for r in rows],
        "clock": {"per_step_s": float(per_step), "per_evaluation_s": float(per_evaluation)},
        "reference": list(reference),
        "ways": ways,
        "p_hypervolume": wilcoxon(ways["thresholds"]["hypervolume"], ways["stages"]["hypervolume"]),
        "p_hypervolume_per_trial_hour": wilcoxon(
            ways["thresholds"]["hypervolume_per_trial_hour"],
            ways["stages"]["hypervolume_per_trial_hour"],
        ),
        "dense_minus_constant_val_score": [
            r["dense_val_score"] - r["constant_val_score"] for r in rows
        ],
        "better": better,
    }
