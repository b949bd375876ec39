"""The benchmark scripts run end to end on tiny settings and write the JSON keys the docs use.

No timing is asserted: these only check that the scripts work, not how fast anything is.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """Import `scripts/<name>.py` as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def padding_json(tiny_glue, tiny_model_dir, tmp_path):
    output = tmp_path / "bench" / "padding.json"
    load_script("bench_padding").main(
        [
            "--tasks=mrpc,stsb",
            f"--data-dir={tiny_glue}",
            f"--model={tiny_model_dir}",
            "--batch-sizes=4,8",
            "--max-length=32",
            f"--cache-dir={tmp_path / 'cache'}",
            f"--output={output}",
        ]
    )
    return output


@pytest.fixture
def inference_json(tiny_model_dir, tmp_path):
    output = tmp_path / "bench" / "inference.json"
    load_script("bench_inference").main(
        [
            f"--model={tiny_model_dir}",
            "--rounds=1",
            "--steps=1",
            "--batch-size=2",
            "--length=16",
            "--r-max=4",
            f"--output={output}",
        ]
    )
    return output


def test_bench_padding(padding_json):
    data = json.loads(padding_json.read_text())
    assert {"benchmark", "command", "config", "machine", "results"} <= set(data)
    assert set(data["results"]) == {"mrpc", "stsb"}
    for entry in data["results"].values():
        assert set(entry["padding_ratio"]) == {"4", "8"}
        for ratios in entry["padding_ratio"].values():
            assert set(ratios) == {"dynamic", "group_by_length", "pad_to_max"}
            assert all(0 <= r < 1 for r in ratios.values())
            # Padding every row to max_length never pads less than padding to the batch's longest.
            assert ratios["pad_to_max"] >= ratios["dynamic"]


def test_bench_inference(inference_json):
    data = json.loads(inference_json.read_text())
    assert {"benchmark", "command", "config", "machine", "median_ms", "ratios"} <= set(data)
    assert set(data["median_ms"]) == {"base", "pruned_merged", "pruned", "rmax"}
    # Half of the gates are zeroed, so pruning keeps half of the ranks ...
    assert data["adapter"]["rank_sum_pruned"] * 2 == data["adapter"]["rank_sum_rmax"]
    # ... and neither pruning nor merging changes the logits.
    assert max(data["logits_max_abs_diff_vs_rmax"].values()) < 1e-5


def test_make_benchmarks_md(padding_json, inference_json, tmp_path):
    output = tmp_path / "benchmarks.md"
    text = load_script("make_benchmarks_md").main(
        [f"--bench-dir={padding_json.parent}", f"--output={output}"]
    )
    assert output.read_text() == text
    assert "## Padding" in text and "## Inference latency" in text
    assert "python scripts/bench_padding.py" in text
    assert "| stsb |" in text


def test_bench_search(tiny_glue, tiny_model_dir, tmp_path):
    """One tiny trial through the real search (Ray, Optuna, MLflow on sqlite): ~15 s."""
    output = tmp_path / "search.json"
    load_script("bench_search").main(
        [
            "--num-samples=1",
            f"--data-dir={tiny_glue}",
            f"--model={tiny_model_dir}",
            "--max-train-samples=16",
            "--max-eval-samples=8",
            "--train-eval-samples=8",
            "--max-length=32",
            "--num-cpus=1",
            "--cpus-per-trial=1",
            f"--output={output}",
        ]
    )
    data = json.loads(output.read_text())
    assert {"benchmark", "command", "config", "machine", "wall_s", "overhead", "parts"} <= set(data)
    assert [t["status"] for t in data["trials"]] == ["finished"]
    assert {"ray_start_s", "data_preparation_s", "mlflow_parent_run_s", "other_s"} <= set(
        data["parts"]
    )
    assert data["train_time_s"] > 0 and 0 < data["overhead"] < 1


def test_bench_hypervolume(tiny_trial, tmp_path):
    """Two arms (random, TPE with both features) × one seed of tiny real searches: the JSON
    holds every arm's candidates and timeline, the analysis compares them at random's compute,
    and make_benchmarks_md renders it."""
    module = load_script("bench_hypervolume")
    output = tmp_path / "bench" / "hypervolume.json"
    proxy = {"max_train_samples": 16, "max_eval_samples": 8, "train_eval_samples": 8}
    args = [
        "--arms=random,tpe+both",
        "--seeds=0",
        "--scale=0.15",
        f"--data-dir={tiny_trial['data_dir']}",
        f"--model={tiny_trial['model']}",
        f"--proxy={json.dumps(proxy | {'max_length': 32})}",
        "--work-dir=work",
        "--num-cpus=2",
        f"--output={output}",
    ]
    result = module.main(args)
    data = json.loads(output.read_text())
    assert {"benchmark", "command", "config", "machine", "entries", "analysis", "goals"} <= set(
        data
    )
    by_arm = {e["arm"]: e for e in data["entries"]}
    assert set(by_arm) == {"random", "tpe+both"}
    assert all(p["stage"] is None for p in by_arm["random"]["candidates"])
    traced = [p for p in by_arm["tpe+both"]["candidates"] if p["stage"] is not None]
    assert traced, "front-tracing trials left stage points"
    arms = data["analysis"]["arms"]
    (baseline,) = arms["random"]["seeds"]
    assert baseline["hv_at_budget"] == baseline["hv_final"] == baseline["baseline_hv"]
    assert 0 < baseline["share_of_budget"] <= 1  # random reaches its own final volume
    assert arms["tpe+both"]["seeds"][0]["points"] == len(by_arm["tpe+both"]["candidates"])
    assert set(data["goals"]) == {"both_reaches_random_with_a_third"}
    assert (output.parent / "hypervolume.png").stat().st_size > 0
    # A second call reads the finished searches back.
    again = module.main(args)
    assert [e["wall_s"] for e in again["entries"]] == [e["wall_s"] for e in result["entries"]]

    text = load_script("make_benchmarks_md").main(
        [f"--bench-dir={output.parent}", f"--output={tmp_path / 'benchmarks.md'}"]
    )
    assert "## Search efficiency" in text
    assert "python scripts/bench_hypervolume.py" in text
    assert "on at least 4 of 5 seeds (here 1 of the 1 run): " in text  # one seed run so far


def test_bench_concurrency_shows_tpe_with_every_trial_at_once_is_random_search(tmp_path):
    output = tmp_path / "concurrency.json"
    data = load_script("bench_concurrency").main(
        [
            "--samplers=tpe,random",
            "--num-samples=8",
            "--concurrent=2,8",
            "--seeds=2",
            f"--output={output}",
        ]
    )
    assert json.loads(output.read_text()) == data
    volume = {(r["sampler"], r["concurrent"]): r["hv_mean"] for r in data["rows"]}
    assert volume[("tpe", 8)] == volume[("random", 8)] == volume[("random", 2)]
    defaults = {(r["sampler"], r["concurrent"]) for r in data["rows"] if r["default"]}
    assert defaults == {("tpe", 2), ("random", 8)}


def test_bench_memory_measures_each_base_dtype(tiny_decoder_dir, tmp_path):
    """The tiny Llama at fp32 and nf4: the step's peak, the frozen bytes and a timed step beside
    the estimate, rendered in docs/benchmarks.md's table."""
    output = tmp_path / "memory.json"
    data = load_script("bench_memory").main(
        [f"--model={tiny_decoder_dir}", "--base-dtypes=fp32,nf4", "--batch-sizes=2",
         "--max-lengths=16", "--timed-steps=1", f"--output={output}"]
    )  # fmt: skip
    assert json.loads(output.read_text()) == data
    rows = {(r["base_dtype"], r["gradient_checkpointing"]): r for r in data["results"]}
    assert set(rows) == {(b, c) for b in ("fp32", "nf4") for c in (False, True)}
    assert all(
        r["peak_bytes"] > r["frozen_bytes"] > 0 and r["step_seconds"] > 0 for r in rows.values()
    )
    assert rows[("nf4", False)]["frozen_bytes"] < rows[("fp32", False)]["frozen_bytes"]
    text = load_script("make_benchmarks_md").main(
        [f"--bench-dir={tmp_path}", f"--output={tmp_path / 'benchmarks.md'}"]
    )
    assert "## A trial's memory at each base_dtype" in text
    assert "Frozen bytes against fp32: " in text and " nf4 0." in text


def test_replay_search_resumes_and_renders(tmp_path):
    table = Path(__file__).resolve().parents[1] / "docs/bench/curves.jsonl"
    output = tmp_path / "replay.jsonl"
    module = load_script("replay_search")
    args = [f"--table={table}", "--trials=12", "--budgets=6", "--workers=2", "--seeds=2"]
    summary = module.main([*args, f"--output={output}"])
    setting = summary["settings"]["6|2"]
    assert setting["seeds"] == [0, 1] and set(setting["arms"]) == set(module.ARMS)
    assert setting["arms"]["random"]["trials"] == 6
    lines = output.read_text().splitlines()
    assert len(lines) == 1 + 2 * len(module.ARMS)  # a header, then one line a replay
    # Run again: every replay is read back, none is run twice.
    module.main([*args, f"--output={output}"])
    assert output.read_text().splitlines() == lines
    assert summary["command"].startswith("python scripts/replay_search.py --trials 12")
    assert (tmp_path / "replay.png").stat().st_size > 0
    text = load_script("make_benchmarks_md").main(
        [f"--bench-dir={tmp_path}", f"--output={tmp_path / 'benchmarks.md'}"]
    )
    assert "## Replayed searches" in text and "the first 12 trials of" in text
    assert str(tmp_path) not in text
