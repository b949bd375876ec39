"""scripts/reproduce.py end to end on the tiny model and data: the JSON, the page and the plot
rendered from it, runs shared between sections, reuse of finished runs, and `--render-only`. No
score is asserted: a tiny random model learns next to nothing in one epoch."""

import json

import pytest
import torch

from tests.test_bench_scripts import load_script


@pytest.fixture
def reproduce_args(tiny_trial, tmp_path):
    torch.set_num_threads(1)
    return [
        "--tasks=mrpc,stsb",
        "--seeds=0,1",
        "--ladder-tasks=stsb",
        "--ladder-ranks=1,4",
        "--ladder-xi-totals=0.3,1.0",
        "--ladder-seeds=0,1",
        "--sensitivity-seeds=0",
        "--r-max=4",
        "--epochs=1",
        "--train-rows=mrpc=16,stsb=12",
        "--eval-rows=8",
        "--train-eval-rows=8",
        "--max-length=32",
        f"--data-dir={tiny_trial['data_dir']}",
        f"--model={tiny_trial['model']}",
        "--cache-dir=cache",
        "--runs-dir=runs",
        "--output=docs/results/reproduce.json",
        "--results-md=docs/results.md",
        "--figure=docs/ladder.png",
        "--threads=1",
    ]


def test_reproduce(reproduce_args, tmp_path):
    script = load_script("reproduce")
    docs = tmp_path / "docs"
    result = script.main(reproduce_args)

    data = json.loads((docs / "results" / "reproduce.json").read_text())
    assert data["command"].startswith("python scripts/reproduce.py --tasks=mrpc,stsb")
    # table2 2 tasks × 2 methods × 2 seeds, ladder 2 ranks + 2 ξ_total × 2 seeds (LoRA r=4 is
    # Table 2's), sensitivity 9, clipping 2: each run once.
    assert len(data["rows"]) == 8 + 6 + 9 + 2
    assert all(r["status"] == "finished" and not r["reused"] for r in data["rows"])
    assert str(tmp_path) not in json.dumps(data), "no machine paths in what the docs are made of"
    analysis = data["analysis"]
    assert [(g["task"], g["method"], g["seeds"]) for g in analysis["table2"]["groups"]] == [
        ("mrpc", "sora", 2),
        ("mrpc", "lora", 2),
        ("stsb", "sora", 2),
        ("stsb", "lora", 2),
    ]
    ladder = analysis["ladder"]["stsb"]
    assert [p["label"] for p in ladder["lora"]] == ["LoRA r=1", "LoRA r=4"]
    assert [p["seeds"] for p in ladder["lora"] + ladder["sora"]] == [2, 2, 2, 2]
    assert {p["vs_ladder"]["where"] for p in ladder["sora"]} <= {"above", "on", "below"}
    assert ladder["reference"][1] == pytest.approx(1.1 * 4 * 2 * (4 * 64 + 96 + 96))
    assert set(analysis["sensitivity"]["cells"]) == {
        f"{xi:g},{lam:g}" for xi in (1e-5, 1e-4, 1e-3) for lam in (1e-3, 0.1, 10.0)
    }
    assert analysis["clipping"]["pairs"] == 2
    assert (docs / "ladder.png").stat().st_size > 0

    text = (docs / "results.md").read_text()
    for heading in ("## Table 2's shape", "## Does SoRA buy", "## Sensitivity", "## Gradient"):
        assert heading in text
    assert "](ladder.png)" in text and "| stsb | lora | 2 |" in text

    # A second invocation reads every run back, untouched.
    metrics = sorted((tmp_path / "runs").glob("*/metrics.json"))
    assert len(metrics) == len(data["rows"])
    mtimes = [path.stat().st_mtime_ns for path in metrics]
    again = script.main(reproduce_args)
    assert all(r["reused"] for r in again["rows"])
    assert [path.stat().st_mtime_ns for path in metrics] == mtimes
    assert again["analysis"] == result["analysis"]

    # The page comes from the JSON alone; a note on what else ran goes into both.
    rendered = (docs / "results.md").read_text()
    (docs / "results.md").unlink()
    script.main([*reproduce_args, "--render-only"])
    assert (docs / "results.md").read_text() == rendered
    script.main([*reproduce_args, "--render-only", "--note=a CI run shared the CPU"])
    assert "a CI run shared the CPU" in (docs / "results.md").read_text()


def test_a_run_folder_with_other_settings_is_refused(reproduce_args):
    script = load_script("reproduce")
    one = ["--sections=table2", "--tasks=mrpc", "--seeds=0"]
    script.main([*reproduce_args, *one])
    with pytest.raises(ValueError, match="other settings .*epochs"):
        script.main([*reproduce_args, *one, "--epochs=2"])


@pytest.fixture
def gpu_preset_args(tiny_trial):
    """`--preset gpu` on the tiny model and data, its grid cut to 3 runs a task, its outputs in
    the test's folder."""
    torch.set_num_threads(1)
    return [
        "--preset=gpu",
        "--ladder-tasks=mrpc,stsb",
        "--ladder-seeds=0",
        "--ladder-ranks=1,4",
        "--ladder-xi-totals=0.5",
        "--r-max=4",
        "--max-length=32",
        f"--data-dir={tiny_trial['data_dir']}",
        f"--model={tiny_trial['model']}",
        "--cache-dir=cache",
        "--runs-dir=runs/gpu",
        "--output=docs/results/reproduce-gpu.json",
        "--results-md=docs/results-gpu.md",
        "--figure=docs/ladder-gpu.png",
        "--threads=1",
    ]


def test_the_gpu_preset_sizes_its_batch_then_runs_the_ladder_on_full_data(
    gpu_preset_args, tmp_path
):
    script = load_script("reproduce")
    result = script.main(gpu_preset_args)

    plan = result["plan"]
    # The tiny grid fits 10 minutes at the first batch sizes tried: the smallest.
    assert [t["batch_sizes"] for t in plan["tried"]] == [{"mrpc": 8, "stsb": 8}] and plan["fits"]
    assert result["settings"]["batch_size"] == "mrpc=8,stsb=8"
    assert result["settings"]["group_by_length"]
    for task, entry in plan["tasks"].items():
        # The full training file less the val hold-out (48 rows, 10%), in batches of 8.
        assert entry["train_rows"] == 43 and entry["sora_steps_per_epoch"] == 6, task
        assert entry["lora_step_s"] > 0 and entry["sora_step_s"] > 0 and entry["estimate_s"] > 0
    assert plan["estimate_s"] == pytest.approx(sum(t["estimate_s"] for t in plan["tasks"].values()))
    assert len(result["rows"]) == 2 * 3
    assert all(r["status"] == "finished" for r in result["rows"])
    assert set(result["analysis"]["ladder"]) == {"mrpc", "stsb"}

    page = (tmp_path / "docs/results-gpu.md").read_text()
    assert page.startswith("# The LoRA ladder against SoRA at full data, on one GPU\n")
    assert "**Sized on cpu**" in page and "| mrpc | 8 | 43 | 6 |" in page
    assert "](ladder-gpu.png)" in page and (tmp_path / "docs/ladder-gpu.png").stat().st_size > 0
    # Only the ladder ran: LoRA r=4 is not a Table 2 of its own.
    assert set(result["analysis"]) == {"ladder"} and "## Table 2" not in page
    assert str(tmp_path) not in page + json.dumps(result["rows"])
    assert not (tmp_path / "docs/results.md").exists(), "the CPU page is left alone"

    # Resumed, the plan is read back (a new measurement could pick another batch size, and the
    # runs already trained would no longer match it), and every run with it.
    again = script.main(gpu_preset_args)
    assert again["plan"] == plan and all(r["reused"] for r in again["rows"])


def test_the_gpu_preset_refuses_a_budget_nothing_fits_before_training(gpu_preset_args, tmp_path):
    script = load_script("reproduce")
    with pytest.raises(SystemExit, match=r"exceeds --budget-minutes 1e-05 on cpu"):
        script.main([*gpu_preset_args, "--budget-minutes=0.00001"])
    assert not (tmp_path / "runs/gpu").exists() and not (tmp_path / "docs").exists()


def test_a_dry_run_plans_for_this_device_then_runs_the_grid_on_a_few_rows(
    gpu_preset_args, tmp_path
):
    script = load_script("reproduce")
    result = script.main([*gpu_preset_args, "--dry-run", "--budget-minutes=0.00001"])

    plan = result["plan"]
    # Nothing fits so small a budget: the task with the longest estimate took the next batch
    # size, one step at a time, until every task was at the largest.
    tried = [t["batch_sizes"] for t in plan["tried"]]
    assert len(tried) == 1 + 2 * 4 and tried[0] == {"mrpc": 8, "stsb": 8}
    assert all(
        sum(a[task] != b[task] for task in a) == 1 for a, b in zip(tried, tried[1:], strict=False)
    )
    assert tried[-1] == {"mrpc": 128, "stsb": 128} and not plan["fits"]
    lowest = min(plan["tried"], key=lambda t: t["estimate_s"])  # what runs when nothing fits
    assert plan["batch_size"] == ",".join(f"{k}={v}" for k, v in lowest["batch_sizes"].items())
    assert {t: e["batch_size"] for t, e in plan["tasks"].items()} == lowest["batch_sizes"]
    assert plan["estimate_s"] == lowest["estimate_s"]
    assert plan["calibration_steps"] == script.DRY_RUN_CALIBRATION_STEPS
    assert all(r["status"] == "finished" for r in result["rows"]) and len(result["rows"]) == 6
    dry = tmp_path / "runs/gpu-dry"
    page = (dry / "results.md").read_text()
    assert page.startswith("# The LoRA ladder against SoRA at full data, on one GPU (dry run)\n")
    assert "none fitted, and the lowest estimate was taken" in page
    assert (dry / "runs/plan.json").exists() and (dry / "ladder.png").exists()
    assert not (tmp_path / "docs").exists() and not (tmp_path / "runs/gpu").exists()


def test_a_dry_run_goes_with_a_sized_batch(reproduce_args, capsys):
    with pytest.raises(SystemExit):
        load_script("reproduce").main([*reproduce_args, "--dry-run"])
    assert "--dry-run goes with --preset gpu" in capsys.readouterr().err
