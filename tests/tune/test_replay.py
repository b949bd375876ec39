"""The replay of searches on a simulated clock (`sora_tune.tune.replay`): its clock, its lookup,
the order of its calls, and, against a real Ray search that sleeps through the recorded times,
its decisions."""

import math
import time
from pathlib import Path

import numpy as np
import pytest
from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter

from sora_tune.curves import read_table
from sora_tune.front import OBJECTIVES
from sora_tune.tune.outcome import StoppedAsPrunedOptunaSearch
from sora_tune.tune.replay import (
    ARMS,
    Arm,
    Clock,
    RecordedTable,
    bootstrap_band,
    compare_tracing,
    goals,
    replay,
    stopped,
    summarize,
    trial_reports,
    wilcoxon,
)
from sora_tune.tune.schedulers import ParetoSuccessiveHalving
from sora_tune.tune.search import make_sampler

REPO = Path(__file__).resolve().parents[2]
DESIGN = {
    "space": {
        "distributions": {
            "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
            "r_max": {"type": "choice", "values": [4, 8]},
        },
        "fixed": {"epochs": 2},
    }
}
EPOCHS = (0.5, 1, 1.5, 2)


def recorded(config, seed, lr, r_max, score, *, intervals=(10, 10, 10, 10), thresholds=2):
    """A recorded trial: 4 evaluations rising to `score`, its adapter shrinking, and
    `thresholds` threshold points at the last (1 s of set-up, 2 s a threshold point)."""
    evaluations = [
        {
            "step": 10 * (i + 1),
            "epoch": epoch,
            "interval_s": interval,
            "val_score": score * epoch / 2,
            "test_score": score,
            "retained_params": 1000 * r_max - 100 * i,
        }
        for i, (epoch, interval) in enumerate(zip(EPOCHS, intervals, strict=True))
    ]
    evaluations[-1]["thresholds"] = [
        {"quantile": q, "val_score": score - q, "retained_params": 500 * r_max * (1 - q)}
        for q in (0.2, 0.6)[:thresholds]
    ]
    return {
        "trial": f"config={config}-seed={seed}",
        "config": config,
        "seed": seed,
        "params": {"lr": lr, "r_max": r_max},
        "status": "finished",
        "wall_s": sum(intervals) + 1 + 2 * thresholds,
        "threshold_s": 2 * thresholds,
        "evaluations": evaluations,
    }


LINES = [
    recorded(0, 0, 2e-4, 4, 0.5),
    recorded(0, 1, 2e-4, 4, 0.6),
    recorded(1, 0, 3e-3, 4, 0.8, intervals=(10, 10, 247, 10)),  # a stalled machine
    recorded(1, 1, 3e-3, 4, 0.7),
    recorded(2, 0, 1e-3, 8, 0.9, intervals=(12, 12, 12, 12)),
    recorded(2, 1, 1e-3, 8, 0.85, intervals=(12, 12, 12, 12)),
]
TABLE = RecordedTable(DESIGN, LINES)


def test_the_clock_takes_medians_by_adapter_width_robust_to_a_stalled_interval():
    clock = Clock.fit(LINES)
    assert clock.evaluations == {"r_max=4": (10, 10, 10, 10), "r_max=8": (12, 12, 12, 12)}
    assert (clock.setup_s, clock.threshold_point_s) == (1, 2)
    # Set-up before the first report; a front-tracing trial scores its thresholds before its last.
    assert clock.durations(LINES[2], trace=False) == [11, 10, 10, 10]
    assert clock.durations(LINES[2], trace=True) == [11, 10, 10, 14]
    assert Clock.own(LINES).durations(LINES[2], trace=False) == [11, 10, 247, 10]


def test_a_suggestion_replays_the_nearest_recorded_configuration_with_its_choices():
    # lr 1.5e-3 is nearer config 2's 1e-3 than config 1's 3e-3 on the log scale, but r_max 4
    # has no distance to bargain with: config 1.
    assert TABLE.nearest({"lr": 1.5e-3, "r_max": 4}) == 1
    assert TABLE.nearest({"lr": 1.5e-3, "r_max": 8}) == 2
    assert TABLE.nearest({"lr": 1e-4, "r_max": 4}) == 0
    # Seeds: fixed by the replay's seed and the suggestion, and both recorded seeds are drawn.
    params = [{"lr": lr, "r_max": 4} for lr in np.geomspace(1e-4, 1e-2, 40)]
    seeds = [TABLE.seed_for(0, p, replay_seed=3) for p in params]
    assert seeds == [TABLE.seed_for(0, p, replay_seed=3) for p in params]
    assert set(seeds) == {0, 1}
    assert seeds != [TABLE.seed_for(0, p, replay_seed=4) for p in params]
    with pytest.raises(ValueError, match="no recorded configuration"):
        RecordedTable(DESIGN, LINES[:4]).nearest({"lr": 1e-3, "r_max": 8})


class Recording(FIFOScheduler):
    """A FIFO scheduler that keeps the calls it gets: (call, trial number, epoch, done)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []
        self.numbers: dict[str, int] = {}

    def on_trial_add(self, tune_controller, trial) -> None:
        self.numbers[trial.trial_id] = len(self.numbers)
        self.calls.append(("add", self.numbers[trial.trial_id]))
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result) -> str:
        self.calls.append(
            ("result", self.numbers[trial.trial_id], result["epoch"], bool(result.get("done")))
        )
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        self.calls.append(("complete", self.numbers[trial.trial_id], result["epoch"]))
        super().on_trial_complete(tune_controller, trial, result)


def test_the_replay_calls_in_tune_controller_s_order_on_its_clock():
    scheduler = Recording()
    search = replay(
        TABLE,
        Clock.fit(LINES),
        Arm("random"),
        seed=0,
        workers=1,
        num_samples=2,
        scheduler=scheduler,
    )
    expected = [
        call
        for n in (0, 1)
        for call in [
            ("add", n),
            *[("result", n, epoch, False) for epoch in EPOCHS],
            ("complete", n, 2),
        ]
    ]
    # The second trial is suggested only once the first completed (one worker, the limiter).
    # The real search's order is checked against Ray itself below.
    assert scheduler.calls == expected
    first, second = search.trials
    assert first.started == 0 and second.started == first.ended == sum(first.durations)
    assert search.end_s == second.ended == first.ended + sum(second.durations)
    assert search.compute_s() == search.end_s


def test_workers_run_trials_at_once_and_a_time_budget_cuts_those_in_flight():
    clock = Clock.fit(LINES)
    search = replay(TABLE, clock, Arm("random"), seed=1, workers=2, num_samples=4)
    starts = sorted(t.started for t in search.trials)
    assert starts[:2] == [0, 0] and starts[2] > 0
    assert search.cut == 0 and len(search.ended()) == 4
    budget = min(t.ended for t in search.trials) + 1
    cut = replay(
        TABLE, clock, Arm("random"), seed=1, workers=2, num_samples=4, time_budget_s=budget
    )
    done = [t for t in search.trials if t.ended <= budget]
    assert cut.end_s == budget and cut.cut == 2 and len(cut.ended()) == len(done) == 2
    # A trial cut in flight counts its time up to the budget, not its points.
    spans = [(t.ended or budget) - t.started for t in cut.trials if t.started is not None]
    assert cut.compute_s() == pytest.approx(sum(spans))
    assert sum(len(cut.points(t)) for t in cut.trials) == 2


def test_pareto_stopping_stops_at_the_rung_and_front_tracing_adds_threshold_points():
    clock = Clock.fit(LINES)
    search = replay(TABLE, clock, ARMS["tpe+both"], seed=0, workers=2, num_samples=12)
    stops = [t for t in search.trials if stopped(t)]
    assert stops and len(stops) < len(search.trials)
    for trial in stops:  # stopped at the rung (epoch 1), having trained to it, with no point
        assert trial.last_result["epoch"] == 1
        assert trial.ended - trial.started == pytest.approx(sum(trial.durations[:2]))
        assert len(search.points(trial)) == 0
    for trial in set(search.trials) - set(stops):  # the trial's point and its 2 thresholds
        assert len(search.points(trial)) == 3
    reports = trial_reports(LINES[4], trace=True)
    assert [p["retained_params"] for p in reports[-1]["stage_points"]] == [7700, 3200, 1600]
    assert "stage_points" not in trial_reports(LINES[4], trace=False)[-1]


def line(arm, seed, end_s, curve, *, points=10, compute_s=3600, trials=10):
    return {
        "arm": arm,
        "budget": 10,
        "workers": 2,
        "seed": seed,
        "end_s": end_s,
        "compute_s": compute_s,
        "points": points,
        "trials": trials,
        "stopped": 0,
        "curve": curve,
    }


def test_the_summary_reads_every_arm_at_random_search_s_time_and_hypervolume():
    lines = [
        line("random", 0, 100, [[50, 1.0], [100, 2.0]]),
        line("random", 1, 120, [[60, 3.0]]),
        line("tpe", 0, 100, [[20, 2.5]]),
        line("tpe", 1, 120, [[90, 2.0], [130, 3.5]]),
        line("tpe+trace", 0, 100, [[10, 2.0]], points=60),
        line("tpe+trace", 1, 120, [[30, 3.0]], points=60),
        line("tpe+pareto", 0, 100, [[30, 2.0]]),  # seed 1 not replayed (yet): paired on seed 0
    ]
    setting = summarize(lines)["10|2"]
    assert setting["seeds"] == [0, 1]
    assert setting["arms"]["tpe+pareto"]["seeds"] == 1
    tpe = setting["arms"]["tpe"]
    # At random's end on each seed: 2.5 (seed 0) and 2.0 (seed 1, its 3.5 came after).
    assert tpe["hv_at_budget"] == pytest.approx(2.25)
    assert tpe["time_shares"] == [0.2, 130 / 120]
    assert tpe["within_third"] == 1
    assert setting["arms"]["random"]["time_shares"] == [1.0, 0.5]
    result = goals(setting)
    assert result["within_third"]["tpe+trace"] == {"seeds": 2, "needed": 2, "met": True}
    assert result["trace_points"]["tpe+trace vs tpe"]["ratio"] == pytest.approx(6)
    assert result["trace_points"]["tpe+trace vs tpe"]["met"] is True


def test_the_statistics_helpers():
    assert wilcoxon([1, 2, 3], [1, 2, 3]) is None
    assert wilcoxon([1, 2, 3, 4, 5, 6, 7, 8], [0] * 8) == pytest.approx(2 / 2**8)
    values = np.array([[0.0, 1.0], [0.0, 3.0], [0.0, 2.0]])
    mean, low, high = bootstrap_band(values)
    assert mean.tolist() == [0, 2] and low[0] == high[0] == 0 and 1 <= low[1] < 2 < high[1] <= 3
    assert not math.isnan(low[1])


class RecordingPareto(ParetoSuccessiveHalving):
    """MO-ASHA keeping the calls it gets and what it decided, by the trial's config."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple] = []

    def on_trial_add(self, tune_controller, trial) -> None:
        self.calls.append(("add", params_of(trial.config)))
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if result["epoch"] == 1:  # the rung: what decisions, and so suggestions, hang on
            self.calls.append(("result", params_of(trial.config), result["epoch"], decision))
        return decision

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        self.calls.append(("complete", params_of(trial.config), result["epoch"]))
        super().on_trial_complete(tune_controller, trial, result)


def params_of(config: dict) -> tuple:
    return tuple(config[name] for name in sorted(DESIGN_OF_TABLE["space"]["distributions"]))


# The validation case: the first 32 trials of the recorded table (it only grows), each trial
# sleeping through its own recorded intervals × SCALE. Seed 24 leaves the events that decisions
# and suggestions hang on (rung reports, completions) at least 18 recorded seconds apart, 0.9 s
# at this scale: far more than Ray's latency in starting a trial on a free actor.
VALIDATION = {"trials": 32, "seed": 24, "workers": 2, "num_samples": 8}
SCALE = 0.05
DESIGN_OF_TABLE, RECORDED = read_table(REPO / "docs/bench/curves.jsonl")
DESIGN_OF_TABLE = DESIGN_OF_TABLE["design"]
RECORDED = RECORDED[: VALIDATION["trials"]]


def relevant_gap(search) -> float:
    """The least simulated time between two rung reports or completions of different trials."""
    events = sorted(
        (trial.started + sum(trial.durations[: i + 1]), trial.trial_id)
        for trial in search.trials
        for i, result in enumerate(trial.reports[: len(trial.decisions)])
        if result["epoch"] == 1 or i == len(trial.decisions) - 1
    )
    return min(b[0] - a[0] for a, b in zip(events[:-1], events[1:], strict=True) if a[1] != b[1])


@pytest.mark.slow  # ~20 s of sleeping, 40-100 s on a busy 2-core machine; fast twin above
def test_the_replay_decides_as_a_real_ray_search_sleeping_through_the_recorded_times(
    local_ray, tmp_path
):
    table = RecordedTable(DESIGN_OF_TABLE, RECORDED)
    clock = Clock.own(RECORDED)
    seed, workers, num_samples = (VALIDATION[k] for k in ("seed", "workers", "num_samples"))
    arm = ARMS["tpe+pareto"]
    directions = dict(OBJECTIVES)
    max_epochs = table.space().largest("epochs")
    simulated = RecordingPareto(directions, max_epochs=max_epochs)
    search = replay(
        table, clock, arm, seed=seed, workers=workers, num_samples=num_samples, scheduler=simulated
    )
    assert relevant_gap(search) * SCALE > 0.5, "the case no longer separates its events"
    assert any(stopped(t) for t in search.trials) and not all(stopped(t) for t in search.trials)

    barrier = tmp_path / "started"
    barrier.mkdir()

    def sleep_through_recorded_times(config: dict) -> None:
        # Ray starts its first trials' actors seconds apart on a busy machine, which the replay
        # does not model: they start their clocks together, once all have started.
        (barrier / tune.get_context().get_trial_id()).touch()
        while len(list(barrier.iterdir())) < workers:
            time.sleep(0.01)
        line = table.lookup(config, seed)
        for seconds, result in zip(
            clock.durations(line, trace=False), trial_reports(line, trace=False), strict=True
        ):
            time.sleep(seconds * SCALE)
            tune.report(result)

    real = RecordingPareto(directions, max_epochs=max_epochs)
    searcher = StoppedAsPrunedOptunaSearch(
        directions, sampler=make_sampler(arm.sampler, seed, num_samples=num_samples)
    )
    tuner = tune.Tuner(
        tune.with_resources(sleep_through_recorded_times, {"cpu": 1}),
        param_space=table.space().to_tune(),
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=workers),
            scheduler=real,
            num_samples=num_samples,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="validation", verbose=0),
    )
    tuner.fit()
    # The same suggestions (Optuna saw the same trials end in the same order), the same rung
    # decisions, in the same order of the calls that matter.
    assert real.calls == simulated.calls
    assert sum(c[-1] == TrialScheduler.STOP for c in real.calls if c[0] == "result") == sum(
        stopped(t) for t in search.trials
    )


def staged(config, seed, scores, params):
    """A recorded staged trial of `recorded`'s constant one: its 4 evaluations (steps 10-40),
    then 2 stages of 5 steps ending at steps 45 and 50; `scores` and `params` at steps 40, 45,
    50. Its intervals (a loaded machine's) do not enter the comparison's clock."""
    evaluations = [
        {"step": step, "interval_s": 99.0, "val_score": 0.1, "retained_params": 5000}
        for step in (10, 20, 30, 40, 45, 50)
    ]
    for evaluation, score, kept in zip(evaluations[3:], scores, params, strict=True):
        evaluation |= {"val_score": score, "retained_params": kept}
    return {"config": config, "seed": seed, "status": "finished", "evaluations": evaluations}


def test_the_two_ways_of_tracing_are_compared_trial_by_trial_on_one_clock():
    constant = [recorded(0, 0, 2e-4, 4, 0.5), recorded(0, 1, 2e-4, 4, 0.6)]
    # Trial 0 0's stages keep its score at a third of its size and end with no rank left.
    staged_lines = [
        staged(0, 0, [0.5, 0.5, 0.45], [3700, 1200, 0]),
        staged(0, 1, [0.55, 0.5, 0.4], [3700, 2000, 1000]),
    ]
    comparison = compare_tracing(constant, staged_lines, stage_steps=5, stages=2)
    # The constant trials' medians: a threshold point (an evaluation) 2 s, an interval of 10
    # steps and an evaluation 10 s, so a step 0.8 s.
    assert comparison["clock"] == pytest.approx({"per_step_s": 0.8, "per_evaluation_s": 2.0})
    thresholds, stages = comparison["ways"]["thresholds"], comparison["ways"]["stages"]
    assert thresholds["points"] == 6 and stages["points"] == 5  # the rank-0 point is no candidate
    # The constant trial: 40 s; (b) adds 2 evaluations, (a) 2 stages of 5 steps and their ends.
    assert thresholds["trial_hours"] == pytest.approx(2 * (40 + 4) / 3600)
    assert stages["trial_hours"] == pytest.approx(2 * (40 + 2 * (4 + 2)) / 3600)
    assert comparison["reference"] == [0.0, pytest.approx(1.1 * 3700)]
    assert comparison["dense_minus_constant_val_score"] == pytest.approx([0.0, -0.05])
    per_hour = {
        way: e["pooled_hypervolume_per_trial_hour"] for way, e in comparison["ways"].items()
    }
    assert comparison["better"] == max(per_hour, key=per_hour.get)
