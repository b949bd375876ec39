"""scripts/reproduce.py end to end on the tiny model and data: the JSON, the Markdown rendered from
it, reuse of finished runs, and `--render-only`. No score is asserted: a tiny random model learns
next to nothing in one epoch."""

import json

import pytest
import torch

from tests.test_bench_scripts import load_script

TASKS, METHODS, R_MAX, SEEDS = ("mrpc", "stsb"), ("sora", "lora"), 4, (0, 1)


@pytest.fixture
def reproduce_args(tiny_glue, tiny_model_dir, tmp_path):
    torch.set_num_threads(1)
    return [
        f"--tasks={','.join(TASKS)}",
        f"--methods={','.join(METHODS)}",
        f"--r-max={R_MAX}",
        f"--seeds={','.join(map(str, SEEDS))}",
        "--epochs=1",
        "--max-train-samples=16",
        "--max-train-samples-per-task=stsb=12",
        "--max-eval-samples=8",
        "--train-eval-samples=8",
        "--max-length=32",
        "--batch-size=8",
        f"--data-dir={tiny_glue}",
        f"--model={tiny_model_dir}",
        f"--cache-dir={tmp_path / 'cache'}",
        f"--runs-dir={tmp_path / 'runs'}",
        f"--output={tmp_path / 'docs' / 'results' / 'reproduce.json'}",
        f"--results-md={tmp_path / 'docs' / 'results.md'}",
        f"--figures-dir={tmp_path / 'docs'}",
        "--sparsify-xi-max=1e-2",
        "--sparsify-xi-stages=2",
        "--sparsify-dense-epochs=1",
        "--threads=1",
    ]


def test_reproduce(reproduce_args, tmp_path):
    """Two invocations and a re-render: ~25 s."""
    script = load_script("reproduce")
    docs = tmp_path / "docs"
    result = script.main(reproduce_args)

    data = json.loads((docs / "results" / "reproduce.json").read_text())
    assert {"config", "machine", "trial_settings", "tasks", "runs", "summary", "sparsify"} <= set(
        data
    )
    assert data["wall_s"] > 0
    assert data["config"]["argv"] == reproduce_args
    assert data["config"]["command"].startswith("python scripts/reproduce.py --tasks=mrpc,stsb")
    assert {"platform", "cpus", "torch", "torch_threads"} <= set(data["machine"])
    assert len(data["runs"]) == len(TASKS) * len(METHODS) * len(SEEDS)
    assert all(r["status"] == "finished" and not r["reused"] for r in data["runs"])
    # One budget for both methods; the per-task override applies to STS-B only.
    assert data["tasks"]["mrpc"]["train_rows"] == 16 and data["tasks"]["stsb"]["train_rows"] == 12
    assert data["tasks"]["stsb"]["baseline"] == 0.0  # a constant guess has no correlation
    assert 0 < data["tasks"]["mrpc"]["baseline"] < 1  # majority-class accuracy
    lora = [r["retained_params"] for r in data["runs"] if r["method"] == "lora"]
    assert len(set(lora)) == 1  # LoRA keeps every rank

    summary = data["summary"]
    assert len(summary["groups"]) == len(TASKS) * len(METHODS)
    for group in summary["groups"]:
        assert group["seeds"] == len(SEEDS)
        assert group["test_score_std"] is not None  # sample std over two seeds
    assert [(d["task"], d["r_max"]) for d in summary["deltas"]] == [(t, R_MAX) for t in TASKS]
    assert {a["method"] for a in summary["average"]} == set(METHODS)

    sweep = data["sparsify"]
    assert [row["stage"] for row in sweep["rows"]] == [0, 1]
    assert [row["xi"] for row in sweep["rows"]] == pytest.approx([1e-4, 1e-2])
    assert (docs / "sparsify_mrpc.png").stat().st_size > 0
    assert (docs / "ranks_mrpc.png").stat().st_size > 0

    text = (docs / "results.md").read_text()
    assert "python scripts/reproduce.py --tasks=mrpc,stsb" in text
    for task in TASKS:
        for method in METHODS:
            assert any(
                line.startswith(f"| {task} | {R_MAX} | {method} |") and " ± " in line
                for line in text.splitlines()
            ), (task, method)
        assert any(
            line.startswith(f"| {task} | {R_MAX} | ") and "%" in line for line in text.splitlines()
        )
    assert (
        "## SoRA − LoRA" in text and "](sparsify_mrpc.png)" in text and "](ranks_mrpc.png)" in text
    )
    assert "need not match the paper" in text

    # A second invocation reads every finished run and the sweep back instead of training again.
    # The grid's runs are read back untouched; the sweep resumes at its end (its curve is
    # compared below), which re-prunes and rewrites its metrics.json.
    metrics_files = sorted((tmp_path / "runs").glob("*/metrics.json"))
    assert len(metrics_files) == len(data["runs"]) + 1
    metrics_files = [path for path in metrics_files if not path.parent.name.startswith("sparsify")]
    mtimes = [path.stat().st_mtime_ns for path in metrics_files]
    again = script.main(reproduce_args)
    assert all(r["reused"] for r in again["runs"]) and again["sparsify"]["reused"]
    assert [path.stat().st_mtime_ns for path in metrics_files] == mtimes
    assert again["summary"] == result["summary"]
    assert again["sparsify"]["rows"] == result["sparsify"]["rows"]  # the sweep resumed at its end

    # The Markdown comes from the JSON alone.
    rendered = (docs / "results.md").read_text()
    (docs / "results.md").unlink()
    script.main([*reproduce_args, "--render-only"])
    assert (docs / "results.md").read_text() == rendered
    # A note on what else ran goes into the JSON and the page.
    script.main([*reproduce_args, "--render-only", "--note=a CI run shared the CPU"])
    assert "a CI run shared the CPU" in (docs / "results.md").read_text()


def test_a_run_folder_with_other_settings_is_refused(reproduce_args):
    script = load_script("reproduce")
    script.main([*reproduce_args, "--tasks=mrpc", "--seeds=0", "--methods=lora", "--skip-sparsify"])
    with pytest.raises(ValueError, match="other settings .*epochs"):
        script.main([*reproduce_args, "--tasks=mrpc", "--seeds=0", "--methods=lora", "--epochs=2"])
