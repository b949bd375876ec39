"""Pareto-aware early stopping (MO-ASHA): rungs, the ranking at a rung, what survives a resume,
and a real search whose scheduler stops exactly the trials a known dominance says it should."""

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import mlflow
import numpy as np
import optuna
import yaml

from sora_tune.front import epsilon_net_order
from sora_tune.tune import run_search
from sora_tune.tune.schedulers import (
    RUNGS_FILE,
    ParetoSuccessiveHalving,
    keeps,
    promotion_order,
    rung_epochs,
)
from tests.tune.conftest import search_in

DIRECTIONS = {"val_score": "maximize", "retained_params": "minimize"}


def test_rungs_sit_at_grace_times_reduction_powers_below_the_budget():
    assert rung_epochs(1, 3, 20) == [1, 3, 9]
    assert rung_epochs(2, 2, 20) == [2, 4, 8, 16]
    assert rung_epochs(1, 3, 3) == [1]
    assert rung_epochs(1, 3, 1) == []


def test_a_rung_ranks_by_front_then_epsilon_net():
    values = np.array(
        [
            [0.75, 300.0],  # 0: on the front, between the ends
            [0.70, 500.0],  # 1: dominated by 2 and 3
            [0.80, 400.0],  # 2: on the front, the best score
            [0.70, 100.0],  # 3: on the front, the other end: farthest from 2
            [np.nan, 50.0],  # 4: diverged
        ]
    )
    assert list(promotion_order(values, list(DIRECTIONS.values()))) == [2, 3, 0, 1, 4]
    # MO-ASHA's rule: position / recorded <= 1 / rf goes on; the first at a rung always does.
    assert [keeps(p, 5, 3) for p in range(5)] == [True, True, False, False, False]
    assert keeps(0, 1, 3) and not keeps(1, 2, 3) and keeps(1, 3, 3) and not keeps(2, 3, 3)


def rung_of(arrivals: list[tuple[str, float, float]], reduction_factor: float = 3) -> dict:
    """The decision on each trial as it reaches rung 1, in the order of `arrivals`."""
    scheduler = ParetoSuccessiveHalving(
        DIRECTIONS, max_epochs=4, grace_period=1, reduction_factor=reduction_factor
    )
    return {
        trial: scheduler.on_trial_result(
            None,
            SimpleNamespace(trial_id=trial),
            {"epoch": 1, "val_score": score, "retained_params": params},
        )
        for trial, score, params in arrivals
    }


def test_a_newcomer_that_dominates_goes_on():
    """The issue's case: C dominates A and has the best score; it must not stop because A and B
    arrived first (ceil(n/rf) and end points favoured by arrival let only one of three on)."""
    arrivals = [("A", 0.80, 200e3), ("B", 0.78, 100e3), ("C", 0.86, 200e3)]
    assert rung_of(arrivals) == {"A": "CONTINUE", "B": "STOP", "C": "CONTINUE"}


def test_a_dominated_newcomer_stops():
    arrivals = [("A", 0.80, 200e3), ("B", 0.78, 100e3), ("D", 0.77, 250e3)]
    assert rung_of(arrivals)["D"] == "STOP"
    # A copy of a point already there ranks with it, not behind it: B's position 1 of 3.
    assert rung_of([("A", 0.8, 200e3), ("B", 0.78, 100e3), ("E", 0.78, 100e3)])["E"] == "CONTINUE"


def test_a_newcomer_that_dominates_every_earlier_trial_goes_on():
    """Worked by hand, rf 3: B is dominated by A (position 1 of 2 > 1/3: stop), D by both
    (2 of 3: stop), and C dominates all three (0 of 4: go on). syne-tune 0.16's code stops C: it
    reads the order [C, A, B, D] = rows [3, 0, 1, 2] as priorities, so C (row 3) gets
    priority 2, a position of 2/4 > 1/3."""
    arrivals = [("A", 0.80, 200.0), ("B", 0.75, 300.0), ("D", 0.60, 400.0), ("C", 0.90, 100.0)]
    assert rung_of(arrivals) == {"A": "CONTINUE", "B": "STOP", "D": "STOP", "C": "CONTINUE"}


def test_inside_a_front_the_spread_is_measured_on_scaled_objectives():
    """One front of four, worked by hand with both objectives min-max scaled (score 0.5-0.9,
    params 100-1000): S (best score) first, then the other end E, then M2, whose nearest taken
    point is 0.56 away (E), before M1, 0.50 away (S). On raw values params outweigh scores, and
    M1 (450 params from both ends) would come before M2 (100 from E)."""
    front = {"S": (0.90, 1000.0), "E": (0.50, 100.0), "M1": (0.89, 550.0), "M2": (0.72, 200.0)}
    order = epsilon_net_order(np.array(list(front.values())), list(DIRECTIONS.values()))
    assert [list(front)[i] for i in order] == ["S", "E", "M2", "M1"]
    # rf 2, in this arrival order: E is 1 of 2 (go on), M1 2 of 3 (stop), M2 2 of 4 (go on;
    # 3 of 4 on raw values, a stop).
    arrivals = [(name, *point) for name, point in front.items()]
    assert rung_of(arrivals, reduction_factor=2) == {
        "S": "CONTINUE",
        "E": "CONTINUE",
        "M1": "STOP",
        "M2": "CONTINUE",
    }


def test_the_order_of_earlier_arrivals_does_not_decide_for_a_newcomer():
    earlier = [("A", 0.80, 200e3), ("B", 0.78, 100e3), ("F", 0.84, 300e3), ("G", 0.70, 50e3)]
    newcomers = [("N1", 0.83, 150e3), ("N2", 0.79, 60e3), ("N3", 0.60, 400e3), ("N4", 0.9, 9e5)]
    for newcomer in newcomers:
        decisions = {
            rung_of([*order, newcomer], reduction_factor=2)[newcomer[0]]
            for order in (
                earlier,
                earlier[::-1],
                earlier[1:] + earlier[:1],
                earlier[2:] + earlier[:2],
            )
        }
        assert len(decisions) == 1, newcomer


def test_a_diverged_trial_without_an_epoch_goes_on_to_its_end():
    """A diverged trial's last report holds NaN objectives and no epoch: CONTINUE, as Ray's own
    schedulers answer a result without their `time_attr`."""
    scheduler = ParetoSuccessiveHalving(DIRECTIONS, max_epochs=4)
    diverged = {"val_score": np.nan, "retained_params": np.nan, "status": "diverged"}
    assert scheduler.on_trial_result(None, SimpleNamespace(trial_id="d"), diverged) == "CONTINUE"
    assert scheduler.recorded == {1: {}, 3: {}}


def test_a_front_tracing_trial_meets_a_rung_at_a_stage_end():
    """Dense phase (epochs 1-2) then stages: rung 1 is taken at the end of the dense phase, the
    first stage end at or after it, never inside it."""
    scheduler = ParetoSuccessiveHalving(DIRECTIONS, max_epochs=9, reduction_factor=3)
    trial = SimpleNamespace(trial_id="t")

    def report(epoch: int, stage_end: bool) -> str:
        result = {"epoch": epoch, "val_score": 0.8, "retained_params": 100, "comparable": stage_end}
        return scheduler.on_trial_result(None, trial, result)

    report(1, stage_end=False)
    assert scheduler.recorded == {1: {}, 3: {}}
    report(2, stage_end=True)
    assert scheduler.recorded == {1: {"t": [0.8, 100.0]}, 3: {}}
    report(3, stage_end=True)
    assert scheduler.recorded[3] == {"t": [0.8, 100.0]}


def test_the_rungs_survive_a_new_scheduler_of_the_same_search(tmp_path):
    """A resumed search gets a fresh scheduler from Ray: it reads the rungs back."""

    def scheduler():
        return ParetoSuccessiveHalving(
            DIRECTIONS, max_epochs=4, grace_period=1, reduction_factor=3, state_folder=str(tmp_path)
        )

    def result(score, params):
        return {"epoch": 1, "val_score": score, "retained_params": params}

    first = scheduler()
    assert (
        first.on_trial_result(None, SimpleNamespace(trial_id="a"), result(0.8, 100)) == "CONTINUE"
    )
    assert (tmp_path / RUNGS_FILE).exists()
    resumed = scheduler()  # what Tuner.restore hands back: the constructor's state only
    assert resumed.on_trial_result(None, SimpleNamespace(trial_id="b"), result(0.7, 200)) == "STOP"
    assert resumed.stopped == {"b": 1}
    fresh = ParetoSuccessiveHalving(DIRECTIONS, max_epochs=4, reduction_factor=3)
    assert (
        fresh.on_trial_result(None, SimpleNamespace(trial_id="b"), result(0.7, 200)) == "CONTINUE"
    )


def dominance_space(tiny_trial: dict) -> tuple[dict, list[dict]]:
    """Trials that learn nothing (lr 0): the same val_score, whatever their rank, and retained
    parameters that grow with r_max, so r_max 2 dominates 4, which dominates 8."""
    parameters = tiny_trial | {
        "epochs": 3,
        "lr": 0.0,
        "r_max": {"type": "choice", "values": [2, 4, 8]},
    }
    return parameters, [{"r_max": 2}, {"r_max": 4}, {"r_max": 8}]


def stopped_trials(uri: str, experiment: str) -> dict[str, str]:
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id], "tags.`sora_tune.role` = 'trial'"
    )
    return {
        r.data.params["r_max"]: r.data.tags.get("sora_tune.stopped_at_epoch", "finished")
        for r in runs
    }


def test_the_scheduler_stops_the_dominated_trials(local_ray, tiny_trial, write_space, tmp_path):
    # One trial at a time, in the order given: r_max 2 reaches rung 1 (epoch 1) alone and goes
    # on; r_max 4 meets it there, is dominated, ranks last of 2 and stops; so does r_max 8.
    parameters, points = dominance_space(tiny_trial)
    _, space = write_space(parameters, points=points)
    config, uri = search_in(
        tmp_path,
        space,
        "mo-asha",
        num_samples=3,
        max_concurrent=1,
        early_stop="pareto",
        reduction_factor=3,
    )
    search = run_search(config)
    assert not search.results.errors
    assert stopped_trials(uri, "mo-asha") == {"2": "finished", "4": "1", "8": "1"}
    study = optuna.load_study(study_name="mo-asha", storage=config.optuna_storage)
    by_r_max = {t.params["r_max"]: t.state.name for t in study.trials}
    assert by_r_max == {2: "COMPLETE", 4: "PRUNED", 8: "PRUNED"}


def test_the_rungs_survive_resume(tiny_trial, tmp_path):
    """Interrupt after r_max 2 passed rung 1, resume: r_max 4 is still measured against it."""
    parameters, points = dominance_space(tiny_trial)
    parameters["epochs"] = 6  # time to interrupt r_max 2 after its rung
    (tmp_path / "space.yaml").write_text(
        yaml.safe_dump({"parameters": parameters, "points_to_evaluate": points})
    )
    command = [sys.executable, "-m", "sora_tune.cli", "search"]
    search = [*command, "--config", "space.yaml", "--num-samples", "3", "--max-concurrent", "1"]
    search += ["--early-stop", "pareto", "--storage-path", "ray", "--name", "rungs"]
    search += ["--experiment-name", "rungs"]
    env = os.environ | {"RAY_ADDRESS": ""}
    driver = subprocess.Popen(search, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    rungs = tmp_path / "ray" / "rungs" / RUNGS_FILE
    deadline = time.monotonic() + 300
    while not rungs.exists():
        assert driver.poll() is None and time.monotonic() < deadline, "no rung was recorded"
        time.sleep(0.2)
    driver.send_signal(signal.SIGINT)
    driver.communicate(timeout=300)
    assert driver.returncode == 130
    resumed = subprocess.run(
        [*command, "--resume", "ray/rungs"], env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    stopped = stopped_trials(f"sqlite:///{tmp_path / 'mlflow.db'}", "rungs")
    assert stopped == {"2": "finished", "4": "1", "8": "1"}
