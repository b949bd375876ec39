"""Reproduce the shape of the paper's Table 2, Figure 2 and Figure 3 at CPU scale.

SoRA against LoRA at every r_max on MRPC, CoLA, STS-B and an SST-2 subset with the packaged
MiniLM, over several seeds, with the same budget per method: identical data subsample, steps,
learning rate and seed; SoRA at its paper defaults (ξ, η, λ of `TrialConfig`), LoRA the same layer
with the gate fixed at 1. Per (task, method, r_max) it reports the mean ± sample std over seeds of
the GLUE dev score (the trials' `test_score`) and of the held-out `val_score`, the retained
parameters, and the SoRA − LoRA deltas; then it runs the sparsifying scheduler (a rising ξ) on one
task and copies its curve (Figure 2) and final-rank heatmap (Figure 3) into the docs.

Everything is written to one JSON file, and `docs/results.md` is rendered from it (`--render-only`
re-renders without training). Every run goes to its own folder under `--runs-dir`; a run whose
folder holds a finished `metrics.json` is read, not trained again, so an interrupted reproduction
continues where it stopped.

    python scripts/reproduce.py                  # the documented reproduction
    python scripts/reproduce.py --render-only    # docs/results.md from docs/results/reproduce.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sora_tune.data import compute_metrics, get_task  # noqa: E402
from sora_tune.sparsify import run_sparsify  # noqa: E402
from sora_tune.train import (  # noqa: E402
    TrialConfig,
    default_model,
    load_tokenizer,
    prepare_data,
    train_trial,
)

REPO = Path(__file__).resolve().parents[1]

# ---- The budget of the documented reproduction: about 70 minutes on 2 cores. ----
EPOCHS = 2  # passes over each task's training subsample
MAX_TRAIN_SAMPLES = 700  # training rows per task (seeded, stratified subsample)
# Shorter sentences train faster: CoLA and SST-2 get more rows for about the same time.
MAX_TRAIN_SAMPLES_PER_TASK: dict[str, int] = {"mrpc": 500, "cola": 1000, "sst2": 1000}
MAX_EVAL_SAMPLES = 300  # rows of val (held out of train) and of test (GLUE dev), per task
TRAIN_EVAL_SAMPLES = 200  # training rows scored every epoch (memorization)
MAX_LENGTH = 128  # tokens per sequence; batches are padded to their longest row only
BATCH_SIZE = 8  # training rows per step, as the authors ran GLUE
SPARSIFY_TASK = "mrpc"  # task of the ξ sweep (Figures 2 and 3)
SPARSIFY_XI_MAX = 1e-2  # last stage's ξ; the sweep starts at TrialConfig's ξ0 (1e-4)
SPARSIFY_XI_STAGES = 5  # ξ values, geometrically spaced from ξ0 to SPARSIFY_XI_MAX
SPARSIFY_XI_EVERY = 1  # epochs per ξ stage
SPARSIFY_DENSE_EPOCHS = 2  # epochs at ξ0 before the first raise
# ---------------------------------------------------------------------------------------

SCORE_SCALE = 100  # scores are shown ×100, as in the paper's tables


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks", default="mrpc,cola,stsb,sst2", help="GLUE tasks, comma-separated"
    )
    parser.add_argument("--methods", default="sora,lora", help="methods: sora, lora, adalora")
    parser.add_argument("--r-max", default="4,8", help="ranks before pruning, comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epochs per run")
    parser.add_argument(
        "--max-train-samples", type=int, default=MAX_TRAIN_SAMPLES, help="training rows per task"
    )
    parser.add_argument(
        "--max-train-samples-per-task",
        default=",".join(f"{k}={v}" for k, v in MAX_TRAIN_SAMPLES_PER_TASK.items()),
        help="per-task training rows overriding --max-train-samples, e.g. sst2=800,cola=600",
    )
    parser.add_argument(
        "--max-eval-samples", type=int, default=MAX_EVAL_SAMPLES, help="rows of val and of test"
    )
    parser.add_argument(
        "--train-eval-samples",
        type=int,
        default=TRAIN_EVAL_SAMPLES,
        help="training rows scored every epoch",
    )
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="training rows per step")
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("SORA_TUNE_DATA_DIR") or str(REPO.parent / "shared/data/glue"),
        help="folder in the official GLUE layout (default $SORA_TUNE_DATA_DIR or ../shared/data/glue)",
    )
    parser.add_argument(
        "--model", default=None, help="backbone name or folder (default the packaged MiniLM)"
    )
    parser.add_argument(
        "--cache-dir", default=None, help="tokenisation cache (default the library's)"
    )
    parser.add_argument(
        "--runs-dir", default=str(REPO / "runs/reproduce"), help="one output folder per run here"
    )
    parser.add_argument(
        "--output", default=str(REPO / "docs/results/reproduce.json"), help="the JSON written"
    )
    parser.add_argument(
        "--results-md", default=str(REPO / "docs/results.md"), help="the Markdown written"
    )
    parser.add_argument(
        "--figures-dir", default=str(REPO / "docs"), help="where the sweep's PNGs are copied"
    )
    parser.add_argument("--sparsify-task", default=SPARSIFY_TASK, help="task of the ξ sweep")
    parser.add_argument(
        "--sparsify-xi-max", type=float, default=SPARSIFY_XI_MAX, help="the sweep's last ξ"
    )
    parser.add_argument(
        "--sparsify-xi-stages",
        type=int,
        default=SPARSIFY_XI_STAGES,
        help="ξ values from ξ0 to --sparsify-xi-max, geometrically spaced",
    )
    parser.add_argument(
        "--sparsify-xi-every", type=int, default=SPARSIFY_XI_EVERY, help="epochs per ξ stage"
    )
    parser.add_argument(
        "--sparsify-dense-epochs",
        type=int,
        default=SPARSIFY_DENSE_EPOCHS,
        help="epochs at ξ0 before the first raise",
    )
    parser.add_argument("--skip-sparsify", action="store_true", help="do not run the ξ sweep")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads"
    )
    parser.add_argument(
        "--note",
        help="what else ran on the machine, shown with the wall time (default: that another job "
        "may have; with --render-only: replaces the recorded note)",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="only rewrite --results-md from an existing --output JSON",
    )
    return parser.parse_args(argv)


def parse_per_task(text: str) -> dict[str, int]:
    """`sst2=800,cola=600` as `{"sst2": 800, "cola": 600}`, with canonical task names.

    Raises:
        ValueError: an entry that is not `task=rows`, or an unknown task.
    """
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        task, _, rows = item.partition("=")
        if not rows.strip().isdigit():
            raise ValueError(f"--max-train-samples-per-task: {item!r} is not task=rows")
        overrides[get_task(task).name] = int(rows)
    return overrides


def machine_info(threads: int, note: str) -> dict[str, Any]:
    cpu_model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "note": note,
    }


def trial_config(args: argparse.Namespace, task: str, method: str, r_max: int, seed: int):
    """The settings of one run: only `method` and `r_max` differ between the runs of a task and
    seed, so every method gets the same data, steps, learning rate and seed."""
    return TrialConfig(
        task=task,
        data_dir=args.data_dir,
        model=args.model,
        method=method,
        r_max=r_max,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_train_samples=args.per_task.get(task, args.max_train_samples),
        max_eval_samples=args.max_eval_samples,
        train_eval_samples=args.train_eval_samples,
        seed=seed,
        cache_dir=args.cache_dir,
    )


def finished_metrics(folder: Path, config: TrialConfig) -> dict | None:
    """The metrics of a run that already ended in `folder`, or `None` if it has not.

    Raises:
        ValueError: the folder holds a run with other settings.
    """
    path = folder / "metrics.json"
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    expected = json.loads(json.dumps(dataclasses.asdict(config)))  # lists as JSON has them
    changed = sorted(k for k, v in expected.items() if metrics.get("config", {}).get(k) != v)
    if changed:
        raise ValueError(
            f"{folder} holds a run with other settings ({', '.join(changed)}); "
            "use another --runs-dir"
        )
    return metrics


def constant_baseline(data, task: str) -> float:
    """The test score of the best constant guess learned from the training split: the majority
    class for classification (Matthews correlation 0 on CoLA), the mean for STS-B (correlation 0)."""
    train = np.asarray(data["train"]["labels"])
    test = np.asarray(data["test"]["labels"])
    if get_task(task).is_regression:
        guess = float(train.mean())
    else:
        guess = Counter(train.tolist()).most_common(1)[0][0]
    return compute_metrics(task, np.full(len(test), guess), test)["score"]


def run_grid(args: argparse.Namespace) -> tuple[list[dict], dict[str, dict]]:
    """Train (or read back) every run; returns one row per run and, per task, the split sizes and
    the constant baseline."""
    tokenizer = None
    runs, tasks = [], {}
    grid = [(t, s) for t in args.tasks for s in args.seeds]
    total = len(grid) * len(args.methods) * len(args.r_max)
    for task, seed in grid:
        # The splits depend on the task and the seed only: tokenise once for every method and rank.
        config = trial_config(args, task, args.methods[0], args.r_max[0], seed)
        tokenizer = tokenizer or load_tokenizer(config)
        data = prepare_data(config, tokenizer)
        sizes = {f"{split}_rows": len(data[split]) for split in ("train", "val", "test")}
        entry = tasks.setdefault(task, sizes | {"metric": get_task(task).primary, "baseline": []})
        entry["baseline"].append(constant_baseline(data, task))
        for method in args.methods:
            for r_max in args.r_max:
                config = trial_config(args, task, method, r_max, seed)
                folder = Path(args.runs_dir) / f"{task}-{method}-r{r_max}-s{seed}"
                metrics = finished_metrics(folder, config)
                reused = metrics is not None
                if not reused:
                    metrics = train_trial(config, output_dir=folder, data=data)
                runs.append(run_row(metrics, config, folder, reused=reused))
                row = runs[-1]
                took = "read back" if reused else f"{row['train_time_s'] or 0:.0f} s"
                print(
                    f"[{len(runs)}/{total}] {task} {method} r_max={r_max} seed={seed}: "
                    f"{row['status']}, test {_score(row['test_score'])}, "
                    f"{_params(row['retained_params'])} params, "
                    f"{took}",
                    flush=True,
                )
    for entry in tasks.values():
        entry["baseline"] = statistics.mean(entry["baseline"])  # the test split varies by seed
    return runs, tasks


def run_row(metrics: dict, config: TrialConfig, folder: Path, *, reused: bool) -> dict:
    return {
        "task": config.task,
        "method": config.method,
        "r_max": config.r_max,
        "seed": config.seed,
        "status": metrics["status"],
        "test_score": metrics.get("test_score"),
        "val_score": metrics.get("val_score"),
        "train_score": metrics.get("train_score"),
        "retained_params": metrics.get("retained_params"),
        "nonzero_rank": metrics.get("nonzero_rank"),
        "head_params": metrics.get("head_params"),
        "train_time_s": metrics.get("train_time_s"),
        "epochs": metrics.get("epoch"),
        "folder": str(folder),
        "reused": reused,
    }


def _mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None  # sample std (ddof=1)


def summarize(runs: list[dict]) -> dict[str, list[dict]]:
    """Mean ± sample std over seeds per (task, method, r_max); SoRA − LoRA per (task, r_max), the
    score delta paired by seed; and the mean over tasks per (method, r_max), as in Table 2."""
    keys = list(dict.fromkeys((r["task"], r["method"], r["r_max"]) for r in runs))
    groups = []
    for task, method, r_max in keys:
        rows = [r for r in runs if (r["task"], r["method"], r["r_max"]) == (task, method, r_max)]
        done = [r for r in rows if r["status"] == "finished"]
        group = {"task": task, "method": method, "r_max": r_max, "seeds": len(done)}
        group["diverged"] = len(rows) - len(done)
        for name in ("test_score", "val_score", "retained_params", "nonzero_rank", "train_time_s"):
            values = [r[name] for r in done]
            group[f"{name}_mean"], group[f"{name}_std"] = _mean(values), _std(values)
        groups.append(group)

    deltas = []
    for task, r_max in dict.fromkeys((t, r) for t, _, r in keys):
        by_seed = {
            method: {
                r["seed"]: r
                for r in runs
                if (r["task"], r["method"], r["r_max"], r["status"])
                == (task, method, r_max, "finished")
            }
            for method in ("sora", "lora")
        }
        seeds = sorted(set(by_seed["sora"]) & set(by_seed["lora"]))
        if not seeds:
            continue
        delta = {"task": task, "r_max": r_max, "seeds": len(seeds)}
        for name in ("test_score", "val_score"):
            diffs = [by_seed["sora"][s][name] - by_seed["lora"][s][name] for s in seeds]
            delta[f"{name}_delta"], delta[f"{name}_delta_std"] = _mean(diffs), _std(diffs)
        sora_params = _mean([by_seed["sora"][s]["retained_params"] for s in seeds])
        lora_params = _mean([by_seed["lora"][s]["retained_params"] for s in seeds])
        delta["retained_params_delta_pct"] = 100 * (sora_params - lora_params) / lora_params
        deltas.append(delta)

    tasks = list(dict.fromkeys(g["task"] for g in groups))
    average = []
    for method, r_max in dict.fromkeys((m, r) for _, m, r in keys):
        scores = [
            g["test_score_mean"]
            for g in groups
            if (g["method"], g["r_max"]) == (method, r_max) and g["test_score_mean"] is not None
        ]
        if len(scores) == len(tasks):  # an average over fewer tasks would not compare
            average.append({"method": method, "r_max": r_max, "test_score_mean": _mean(scores)})
    return {"groups": groups, "deltas": deltas, "average": average}


def run_sweep(args: argparse.Namespace) -> dict:
    """The sparsifying scheduler on `--sparsify-task` at the largest r_max and the first seed;
    copies `sparsify.png` and `ranks.png` to `--figures-dir` as `sparsify_<task>.png` and
    `ranks_<task>.png`."""
    task, r_max, seed = get_task(args.sparsify_task).name, max(args.r_max), args.seeds[0]
    settings = dataclasses.asdict(trial_config(args, task, "sora", r_max, seed))
    del settings["epochs"]  # the schedule's length
    config = TrialConfig.for_schedule(
        settings
        | {
            "xi_schedule": "geometric",
            "xi_max": args.sparsify_xi_max,
            "xi_stages": args.sparsify_xi_stages,
            "xi_every": args.sparsify_xi_every,
            "dense_epochs": args.sparsify_dense_epochs,
        }
    )
    folder = Path(args.runs_dir) / f"sparsify-{task}-r{r_max}-s{seed}"
    reused = finished_metrics(folder, config) is not None  # refuses a folder of other settings
    rows = run_sparsify(config, folder)  # a finished or interrupted sweep resumes, curve intact
    metrics = json.loads((folder / "metrics.json").read_text())
    figures = {}
    for name in ("sparsify", "ranks"):
        source = folder / f"{name}.png"
        if source.exists():
            target = Path(args.figures_dir) / f"{name}_{task}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            figures[name] = str(target.resolve())
    print(f"ξ sweep on {task}: {len(rows)} stages{' (read back)' if reused else ''}", flush=True)
    return {
        "config": dataclasses.asdict(config),
        "xi_values": config.xi_plan().values(),
        "rows": rows,
        "final_nonzero_rank": metrics.get("nonzero_rank"),
        "train_time_s": metrics.get("train_time_s"),
        "rank_pattern": metrics.get("rank_pattern"),
        "figures": figures,
        "folder": str(folder),
        "reused": reused,
    }


# ---- Markdown ----


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _score(mean: float | None, std: float | None = None, *, sign: bool = False) -> str:
    if mean is None:
        return "–"
    text = f"{SCORE_SCALE * mean:+.1f}" if sign else f"{SCORE_SCALE * mean:.1f}"
    spread = "n/a" if std is None else f"{SCORE_SCALE * std:.1f}"
    return f"{text} ± {spread}"


def _params(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def render_markdown(result: dict, md_path: Path, json_path: Path) -> str:
    """`docs/results.md` from the JSON that `main` writes to `json_path`: every number comes
    from it; links are relative to `md_path`."""
    config, machine, summary = result["config"], result["machine"], result["summary"]
    args, tasks = config["args"], result["tasks"]
    runs, reused = result["runs"], sum(r["reused"] for r in result["runs"])
    output = os.path.relpath(json_path.resolve(), md_path.resolve().parent)
    train_rows = sorted({entry["train_rows"] for entry in tasks.values()})
    margins = [
        (g["test_score_mean"] - tasks[g["task"]]["baseline"], g["test_score_std"] or 0.0)
        for g in summary["groups"]
        if g["test_score_mean"] is not None
    ]
    above = sum(margin > 0 for margin, _ in margins)
    clearly_above = sum(margin > std for margin, std in margins)
    lines = [
        "# Reproduction: SoRA against LoRA at CPU scale",
        "",
        f"Generated by `scripts/reproduce.py` from [`{output}`]({output}); do not edit by hand. "
        "Rerun the command below, or add `--render-only` to re-render this page from the JSON.",
        "",
        "The shape of the paper's Table 2 (Ding et al. 2023): SoRA and LoRA at each r_max on GLUE "
        "tasks, scores as mean ± sample standard deviation over seeds, with the parameters each "
        "adapter retains, plus the ξ sweep of Figure 2 and the final ranks of Figure 3. **This is "
        f"a CPU-sized run, not the paper's setting**: {config['model_name']} instead of "
        f"DeBERTaV3-base, {'–'.join(map(str, sorted({min(train_rows), max(train_rows)})))} "
        "training rows per task and "
        f"{args['epochs']} epoch(s) instead of the full training sets, no per-task tuning. The "
        "numbers below say what happens at this budget; they need not match the paper's, and "
        "they are reported as they came out.",
        "",
        "## Command and machine",
        "",
        "```bash",
        config["command"],
        "```",
        "",
        f"Machine: {machine['platform']}, {machine['cpu_model']}, {machine['cpus']} CPUs, "
        f"{machine['torch_threads']} torch threads, Python {machine['python']}, torch "
        f"{machine['torch']}; {machine['note']}.",
        "",
        f"Wall time of this invocation: {result['wall_s'] / 60:.1f} min for {len(runs)} runs"
        + (f" ({reused} read back from an earlier invocation's folders)" if reused else "")
        + (" and the ξ sweep" if result["sparsify"] else "")
        + ". Training and evaluation time (kept across interruptions) summed over the runs: "
        f"{sum(r['train_time_s'] or 0 for r in runs) / 60:.1f} min"
        + (
            f"; of the ξ sweep: {(result['sparsify']['train_time_s'] or 0) / 60:.1f} min."
            if result["sparsify"]
            else "."
        ),
        "",
        "## Budget (the same for every method)",
        "",
        f"Seeds {', '.join(map(str, args['seeds']))}; {args['epochs']} epoch(s), batch "
        f"{args['batch_size']}, max length {args['max_length']} tokens, learning rate "
        f"{result['trial_settings']['lr']:g}. SoRA: ξ = {result['trial_settings']['xi']:g}, "
        f"η = {result['trial_settings']['eta']:g}, λ = {result['trial_settings']['lam']:g} "
        "(the package defaults); LoRA: the same layer with the gate fixed at 1. A seed sets the "
        "training subsample, the hold-out, the initialisation and the data order; SoRA and LoRA "
        "with the same seed see the same rows in the same order. `val` is held out of the "
        "training file; `test` is (a seeded subsample of) GLUE dev, whose score is reported, as "
        "in the paper; all scores are of the last epoch.",
        "",
        *_table(
            ["task", "metric", "train rows", "val rows", "test rows", "constant guess (test)"],
            [
                [
                    task,
                    entry["metric"],
                    str(entry["train_rows"]),
                    str(entry["val_rows"]),
                    str(entry["test_rows"]),
                    f"{SCORE_SCALE * entry['baseline']:.1f}",
                ]
                for task, entry in tasks.items()
            ],
        ),
        "",
        "The constant guess predicts the training split's majority class (the mean score for "
        "STS-B) for every row: the score of a model that learned nothing from the text (Matthews "
        "and Pearson correlations are 0 for it).",
        "",
        "## Scores",
        "",
        f"Scores ×{SCORE_SCALE} on the test split (GLUE dev), mean ± sample std over seeds; "
        "retained parameters Σ r_k (in_k + out_k) over the adapted modules after pruning (the "
        "classification head, trained in full by both methods, is not counted); train s: "
        "seconds of training and per-epoch evaluation per run, mean over seeds.",
        "",
        *_table(
            ["task", "r_max", "method", "test score", "val score", "retained params", "train s"],
            [
                [
                    g["task"],
                    str(g["r_max"]),
                    g["method"] + (f" ({g['diverged']} diverged)" if g["diverged"] else ""),
                    _score(g["test_score_mean"], g["test_score_std"]),
                    _score(g["val_score_mean"], g["val_score_std"]),
                    _params(g["retained_params_mean"]),
                    f"{g['train_time_s_mean']:.0f}" if g["train_time_s_mean"] is not None else "–",
                ]
                for g in summary["groups"]
            ],
        ),
        "",
        f"{above} of {len(summary['groups'])} (task, method, r_max) mean test scores are above "
        f"the task's constant guess; {clearly_above} of them by more than their standard "
        "deviation over seeds.",
    ]
    if summary["average"]:
        lines += [
            "",
            "Mean test score over the tasks (the paper's Avg. column): "
            + "; ".join(
                f"{a['method']} r_max {a['r_max']}: {SCORE_SCALE * a['test_score_mean']:.1f}"
                for a in summary["average"]
            )
            + ".",
        ]
    if summary["deltas"]:
        deltas = summary["deltas"]
        lines += [
            "",
            "## SoRA − LoRA",
            "",
            f"Score deltas ×{SCORE_SCALE} paired by seed (mean ± sample std of the per-seed differences); "
            "retained parameters of SoRA relative to LoRA.",
            "",
            *_table(
                ["task", "r_max", "Δ test score", "Δ val score", "Δ retained params"],
                [
                    [
                        d["task"],
                        str(d["r_max"]),
                        _score(d["test_score_delta"], d["test_score_delta_std"], sign=True),
                        _score(d["val_score_delta"], d["val_score_delta_std"], sign=True),
                        f"{d['retained_params_delta_pct']:+.1f}%",
                    ]
                    for d in deltas
                ],
            ),
            "",
            _verdict(deltas),
            "",
            _threshold_budget(result),
        ]
    if result["sparsify"]:
        lines += ["", *_sweep_section(result["sparsify"], md_path)]
    return "\n".join(lines) + "\n"


def _verdict(deltas: list[dict]) -> str:
    """What the delta table says, counted from it."""
    better = sum(d["test_score_delta"] > 0 for d in deltas)
    beyond = sum(
        d["test_score_delta_std"] is not None
        and abs(d["test_score_delta"]) > d["test_score_delta_std"]
        for d in deltas
    )
    smaller = [d["retained_params_delta_pct"] for d in deltas]
    return (
        f"SoRA's mean test score is higher than LoRA's in {better} of {len(deltas)} (task, "
        f"r_max) pairs; in {beyond} of {len(deltas)} the mean difference is larger than the "
        f"standard deviation of the per-seed differences. SoRA's retained parameters differ "
        f"from LoRA's by {min(smaller):+.1f}% to {max(smaller):+.1f}%."
    )


def _threshold_budget(result: dict) -> str:
    """Why SoRA prunes little at this budget, from the settings: the soft threshold takes at most
    ξ off a gate per step."""
    xi, args = result["trial_settings"]["xi"], result["config"]["args"]
    steps = max(
        math.ceil(entry["train_rows"] / args["batch_size"]) * args["epochs"]
        for entry in result["tasks"].values()
    )
    return (
        f"The soft threshold takes at most ξ = {xi:g} off a gate's magnitude per step: "
        f"{xi * steps:.3g} over the {steps} steps of the longest run here, while the gates "
        "start as draws of N(0, 1). So at this budget SoRA prunes few ranks, and its parameter "
        "count stays close to LoRA's; the paper's runs take many thousands of steps. The sweep "
        "below raises ξ, and with it the pruning."
    )


def _sweep_section(sweep: dict, md_path: Path) -> list[str]:
    config = sweep["config"]
    xi = ", ".join(f"{x:.2g}" for x in sweep["xi_values"])
    lines = [
        f"## ξ sweep on {config['task']} (Figures 2 and 3)",
        "",
        f"SoRA at r_max {config['r_max']}, seed {config['seed']}, "
        f"at most {config['max_train_samples']} training rows: {config['dense_epochs']} dense "
        "epoch(s) "
        f"at ξ0, then ξ raised every {config['xi_every']} epoch(s) through {xi} ({config['epochs']} "
        "epochs; the learning rate restarts at every stage). One point per stage, at its end; "
        f"scores ×{SCORE_SCALE}.",
        "",
        *_table(
            ["stage", "epoch", "ξ", "retained params", "train score", "val score", "test score"],
            [
                [
                    str(row["stage"]),
                    str(row["epoch"]),
                    f"{row['xi']:.2g}",
                    _params(row["retained_params"]),
                    f"{SCORE_SCALE * row['train_score']:.1f}",
                    f"{SCORE_SCALE * row['val_score']:.1f}",
                    f"{SCORE_SCALE * row['test_score']:.1f}",
                ]
                for row in sweep["rows"]
            ],
        ),
    ]
    captions = {
        "sparsify": "Memorization (train score) and generalization (val score) against the "
        "retained parameters, one point per ξ stage (Figure 2)",
        "ranks": f"Final rank of every adapted module by layer after the sweep; "
        f"{sweep['final_nonzero_rank']} ranks of "
        f"{config['r_max'] * len(sweep['rank_pattern'] or {})} kept (Figure 3)",
    }
    for name, path in sweep["figures"].items():
        link = os.path.relpath(path, md_path.resolve().parent)
        lines += ["", f"![{captions[name]}]({link})", "", captions[name] + "."]
    return lines


def print_table(summary: dict) -> None:
    print(f"{'task':<6}{'r_max':>6} {'method':<8}{'test score':>14}{'val score':>14}{'params':>10}")
    for g in summary["groups"]:
        print(
            f"{g['task']:<6}{g['r_max']:>6} {g['method']:<8}"
            f"{_score(g['test_score_mean'], g['test_score_std']):>14}"
            f"{_score(g['val_score_mean'], g['val_score_std']):>14}"
            f"{_params(g['retained_params_mean']):>10}"
        )
    for d in summary["deltas"]:
        print(
            f"{d['task']:<6}{d['r_max']:>6} sora−lora test "
            f"{_score(d['test_score_delta'], d['test_score_delta_std'], sign=True)}, params "
            f"{d['retained_params_delta_pct']:+.1f}%"
        )


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    output, md_path = Path(args.output), Path(args.results_md)
    if args.render_only:
        result = json.loads(output.read_text())
        if args.note is not None:  # an account of the run's conditions, given afterwards
            result["machine"]["note"] = args.note
            output.write_text(json.dumps(result, indent=2))
        md_path.write_text(render_markdown(result, md_path, output))
        print(f"wrote {md_path}")
        return result

    args.tasks = [get_task(t).name for t in args.tasks.split(",")]
    args.methods = args.methods.split(",")
    args.r_max = [int(r) for r in args.r_max.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.per_task = parse_per_task(args.max_train_samples_per_task)
    for name in ("data_dir", "runs_dir", "output", "results_md", "figures_dir"):
        setattr(args, name, str(Path(getattr(args, name)).resolve()))
    model_name = "the packaged all-MiniLM-L6-v2" if args.model is None else f"`{args.model}`"
    args.model = args.model or default_model()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    runs, tasks = run_grid(args)
    sweep = None if args.skip_sparsify else run_sweep(args)
    sora = trial_config(args, args.tasks[0], "sora", args.r_max[0], args.seeds[0])
    result = {
        "config": {
            "command": shlex.join(["python", "scripts/reproduce.py", *argv]),
            "argv": argv,
            "args": vars(args),
            "model_name": model_name,
        },
        "machine": machine_info(args.threads, args.note or "another job may share the CPU"),
        "trial_settings": {k: getattr(sora, k) for k in ("lr", "lam", "alpha", "gate_mode")}
        | {"xi": sora.xi_plan().xi, "eta": sora.effective_eta},
        "tasks": tasks,
        "runs": runs,
        "summary": summarize(runs),
        "sparsify": sweep,
        "wall_s": time.perf_counter() - start,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(render_markdown(result, md_path, output))
    print_table(result["summary"])
    print(f"wall {result['wall_s'] / 60:.1f} min; wrote {output} and {md_path}")
    return result


if __name__ == "__main__":
    main()
