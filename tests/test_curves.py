"""`sora_tune.curves` and scripts/record_curves.py: the design, the recorded table, its resume
and its rank correlations, on the tiny model and data (a few seconds)."""

import json
import math

import pytest

from sora_tune.config import TrialConfig
from sora_tune.curves import (
    GateThresholds,
    design,
    from_unit,
    rank_correlations,
    read_table,
    to_unit,
)
from sora_tune.train import prepare_data, train_trial
from sora_tune.tune.space import SearchSpace
from tests.test_bench_scripts import load_script

SPACE = SearchSpace(
    distributions={
        "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "r_max": {"type": "choice", "values": [4, 8]},
        "xi_total": {"type": "uniform", "low": 0.1, "high": 1.5},
        "epochs": {"type": "int", "low": 1, "high": 4},
    }
)


def test_the_design_fills_each_parameter_on_its_own_scale():
    points = design(SPACE, 8, seed=0)
    assert points == design(SPACE, 8, seed=0) != design(SPACE, 8, seed=1)
    # A Latin hypercube: each eighth of lr's log range, and of xi_total's range, holds one point.
    assert sorted(int(8 * math.log(p["lr"] / 1e-4) / math.log(100)) for p in points) == [*range(8)]
    assert sorted(int(8 * (p["xi_total"] - 0.1) / 1.4) for p in points) == [*range(8)]
    assert sorted(p["r_max"] for p in points) == [4] * 4 + [8] * 4
    assert sorted(p["epochs"] for p in points) == [1, 1, 2, 2, 3, 3, 4, 4]


@pytest.mark.parametrize(
    ("spec", "u", "value"),
    [
        ({"type": "loguniform", "low": 1e-4, "high": 1e-2}, 0.5, 1e-3),
        ({"type": "int", "low": 1, "high": 3}, 0.999, 3),
        ({"type": "int", "low": 1, "high": 7, "log": True}, 0.5, 2),  # sqrt(1 · 8), floored
        ({"type": "choice", "values": ["a", "b", "c"]}, 0.5, "b"),
    ],
)
def test_from_unit(spec, u, value):
    assert from_unit(spec, u) == pytest.approx(value)


@pytest.mark.parametrize(
    ("spec", "value"),
    [
        ({"type": "loguniform", "low": 1e-4, "high": 1e-2}, 3e-3),
        ({"type": "uniform", "low": 0.1, "high": 1.5}, 0.7),
        ({"type": "int", "low": 1, "high": 7, "log": True}, 5),
        ({"type": "choice", "values": [4, 8]}, 8),
    ],
)
def test_to_unit_is_from_unit_s_inverse(spec, value):
    assert from_unit(spec, to_unit(spec, value)) == pytest.approx(value)


def test_gate_thresholds_leave_the_trial_as_it_trains_without_them(tiny_trial, tmp_path):
    config = TrialConfig.from_dict(
        tiny_trial | {"task": "stsb", "epochs": 2, "eval_steps": 2, "xi_total": 0.5}
    )
    data = prepare_data(config)
    thresholds = GateThresholds(config, data, quantiles=(0.5,), every=1)
    with_points = train_trial(config, output_dir=tmp_path / "a", data=data, report=thresholds)
    without = train_trial(config, output_dir=tmp_path / "b", data=data)
    steps = [m["step"] for m in without["history"]]
    assert sorted(thresholds.points) == steps  # every evaluation, as asked
    scores = [(m["val_score"], m["retained_params"]) for m in without["history"]]
    assert [(m["val_score"], m["retained_params"]) for m in with_points["history"]] == scores
    for metrics in without["history"]:
        (point,) = thresholds.points[metrics["step"]]
        assert point["quantile"] == 0.5 and point["retained_params"] < metrics["retained_params"]


def _line(config, seed, vals, params=(100, 100, 50)):
    evaluations = [
        {"step": 10 * (i + 1), "epoch": i + 1, "val_score": v, "retained_params": p}
        for i, (v, p) in enumerate(zip(vals, params, strict=True))
    ]
    return {
        "trial": f"config={config}-seed={seed}",
        "config": config,
        "seed": seed,
        "status": "finished",
        "wall_s": 1.0,
        "threshold_s": 0.0,
        "evaluations": evaluations,
    }


def test_rank_correlations_say_when_early_scores_rank_trials_as_the_end():
    # The first evaluation ranks the trials backwards, the second as the end does.
    lines = [
        _line(c, s, [0.9 - 0.1 * c, 0.1 * c, 0.1 * c + 0.01 * s]) for c in range(4) for s in (0, 1)
    ]
    analysis = rank_correlations(lines)
    rho = [row["val_score"] for row in analysis["rows"]]
    assert rho[0] < 0 and rho[1] > 0.9 and rho[2] == pytest.approx(1.0)
    assert analysis["reliable_from_step"] == 20
    assert analysis["summary"].startswith("From step 20 of 30 (67% of training) on")
    assert analysis["seed_agreement"] == {"configurations": 4, "val_score": pytest.approx(1.0)}
    assert analysis["rows"][0]["retained_params"] is None  # equal everywhere: undefined

    backwards = rank_correlations(
        [_line(c, 0, [0.1 * c, 0.9 - 0.1 * c, 0.1 * c]) for c in range(4)]
    )
    assert backwards["reliable_from_step"] is None
    assert backwards["summary"].startswith("Early stopping cannot help on this proxy")


def test_record_curves_resumes_and_reports(tiny_trial, tmp_path):
    """Three trials of a 2 × 2 design in two calls: the second skips what the first recorded and
    reruns the trial an interrupted call left; --report reads the table, and
    make_benchmarks_md renders its section. --staged records the first configuration as §4's
    option (a) and --staged --report compares it with the thresholds."""
    module = load_script("record_curves")
    output = tmp_path / "bench" / "curves.jsonl"
    proxy = {
        "max_train_samples": 24,  # 3 steps an epoch
        "max_eval_samples": 8,
        "train_eval_samples": 8,
        "max_length": 32,
        "eval_steps": 2,  # 3 evaluations; thresholds at the last (every 5th)
        "cache_dir": "cache",
    }
    args = [
        "--configurations=2",
        f"--proxy={json.dumps(proxy)}",
        f"--data-dir={tiny_trial['data_dir']}",
        f"--model={tiny_trial['model']}",
        f"--output={output}",
        "--work-dir=work",
    ]
    first = module.main([*args, "--limit=2"])["lines"]
    assert [line["trial"] for line in first] == ["config=0-seed=0", "config=0-seed=1"]
    (tmp_path / "work" / "config=1-seed=0" / "checkpoint-step1").mkdir(parents=True)  # a kill
    lines = module.main([*args, "--limit=3"])["lines"]
    assert lines[:2] == first  # read back, not trained again
    header, table = read_table(output)
    assert header["design"]["configurations"] == 2 and "tiny-bert" in json.dumps(header)
    assert table == lines and len(table) == 3
    assert not (tmp_path / "work" / "config=1-seed=0").exists()

    line = lines[2]
    assert line["status"] == "finished" and set(line["params"]) == {"lr", "r_max", "xi_total"}
    assert [e["step"] for e in line["evaluations"]] == [2, 4, 6]
    for evaluation in line["evaluations"]:
        assert {"epoch", "interval_s", "val_score", "test_score", "retained_params"} <= set(
            evaluation
        )
        assert evaluation["interval_s"] > 0
    *early, last = line["evaluations"]
    assert all("thresholds" not in e for e in early)
    points = last["thresholds"]
    assert [p["quantile"] for p in points] == [0.2, 0.4, 0.6, 0.8]
    kept = [p["retained_params"] for p in points]
    assert kept == sorted(kept, reverse=True) and kept[-1] < last["retained_params"]

    with pytest.raises(ValueError, match="holds another design"):
        module.main([*args, "--design-seed=1"])

    result = module.main([*args, "--report"])
    assert json.loads(output.with_suffix(".json").read_text()) == result
    assert result["recorded"] == 3 and result["planned"] == 4
    assert [row["step"] for row in result["analysis"]["rows"]] == [2, 4, 6]
    text = load_script("make_benchmarks_md").main(
        [f"--bench-dir={output.parent}", f"--output={tmp_path / 'benchmarks.md'}"]
    )
    assert "## Recorded learning curves" in text
    assert "python scripts/record_curves.py --report" in text

    staged_args = [*args, "--staged", f"--output={output.with_name('curves_staged.jsonl')}"]
    staged = module.main([*staged_args, "--limit=2", "--work-dir=work-staged"])["lines"]
    assert [line["trial"] for line in staged] == ["config=0-seed=0", "config=0-seed=1"]
    # The constant trial's 6 steps, then 3 stages of 1 step in one more epoch.
    steps = [e["step"] for e in staged[0]["evaluations"]]
    assert steps == [2, 4, 6, 7, 8, 9] and "thresholds" not in staged[0]["evaluations"][-1]
    compared = module.main([*staged_args, "--report"])
    assert json.loads(output.with_name("curves_staged.json").read_text()) == compared
    assert compared["comparison"]["pairs"] == [{"config": 0, "seed": 0}, {"config": 0, "seed": 1}]
    text = load_script("make_benchmarks_md").main(
        [f"--bench-dir={output.parent}", f"--output={tmp_path / 'benchmarks.md'}"]
    )
    assert "## Front-tracing: stages against thresholds" in text
