"""Reproduce the paper's comparisons at CPU scale, and answer the question users have.

Four sections, every run a trial of `sora_tune.train` on the packaged MiniLM with the corrected
defaults (gates at the trial's learning rate, gradients clipped at 0.1 as the authors ran):

- table2: the shape of the paper's Table 2, SoRA against LoRA at the same r_max on MRPC, CoLA,
  STS-B and SST-2 subsets, paired by seed.
- ladder: does SoRA buy a smaller adapter at the same score? On STS-B and SST-2, the LoRA rank
  ladder (r = 1, 2, 4, 8) against SoRA at r_max 8 with a few `xi_total` values; score against
  retained parameters, and the hypervolume of each front with one shared reference point.
- sensitivity: the paper's Tables 6 and 7 (stable over ξ and over η_t, which is the weight λ of
  mean|g| in the authors' code): a ξ × λ grid on STS-B.
- clipping: the authors' clip norm 0.1 against 1.0.

`--preset gpu` asks the ladder question at full data: the ladder section on the full training
sets of SST-2, STS-B, MRPC and CoLA, 3 seeds, one pass each, sized to about 10 minutes on one
GPU. It first measures a trial's step and scoring times on the device (`measure_speed`), then
takes the smallest batch size whose estimated total fits `--budget-minutes`; the plan is kept in
the runs folder, so a resumed run keeps its batch size. It writes its own page
(`docs/results-gpu.md`) and leaves `docs/results.md` alone. `--dry-run` measures and prints the
plan for this device, then runs the same grid on a few rows per task, into `<runs-dir>-dry/`.

The grid runner is `sora_tune.experiments.run_grid`: one folder per run under `--runs-dir`, a
finished run read back, so an interrupted reproduction continues where it stopped. Everything
goes to one JSON file, and `docs/results.md` and `docs/ladder.png` are rendered from it
(`--render-only` re-renders without training).

    python scripts/reproduce.py                  # the documented reproduction (~2 h, 2 cores)
    python scripts/reproduce.py --render-only    # docs/results.md from docs/results/reproduce.json
    python scripts/reproduce.py --preset gpu     # docs/results-gpu.md (~10 min, one H100-class GPU)
    python scripts/reproduce.py --preset gpu --dry-run   # the plan for this device, and a tiny run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from sora_tune.config import DEFAULT_XI, TrialConfig  # noqa: E402
from sora_tune.data import get_task  # noqa: E402
from sora_tune.experiments import (  # noqa: E402
    GridRun,
    TrialSpeed,
    mean_std,
    measure_speed,
    paired_deltas,
    run_grid,
)
from sora_tune.front import OBJECTIVES, hypervolume, is_pareto_front  # noqa: E402
from sora_tune.train import default_device, prepare_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("table2", "ladder", "sensitivity", "clipping")

# ---- The budget of the documented reproduction: about 2 hours on 2 cores. ----
EPOCHS = 2  # passes over each task's training subsample
# Training rows per task: shorter sentences train faster, so CoLA and SST-2 get more.
TRAIN_ROWS = {"mrpc": 500, "cola": 1000, "stsb": 700, "sst2": 1000}
EVAL_ROWS = 300  # rows of val (held out of train) and of test (GLUE dev), per task
TRAIN_EVAL_ROWS = 200  # training rows scored every epoch (memorization)
MAX_LENGTH = 128  # tokens per sequence; batches are padded to their longest row only
R_MAX = 8  # SoRA's rank before pruning, and LoRA's rank in Table 2
TABLE2_SEEDS = (0, 1, 2, 3, 4)
LADDER_TASKS = ("stsb", "sst2")
LADDER_RANKS = (1, 2, 4, 8)  # LoRA
LADDER_XI_TOTALS = (0.3, 0.6, 1.0, 1.4)  # SoRA: ξ × gate steps, from little pruning to a lot
LADDER_SEEDS = (0, 1, 2)
SENSITIVITY_XIS = (1e-5, 1e-4, 1e-3)  # Table 6's range
SENSITIVITY_LAMS = (1e-3, 0.1, 10.0)  # Table 7's range (η_t in the paper, λ here)
SENSITIVITY_SEEDS = (0, 1)
CLIPPING_NORM = 1.0  # against the default, 0.1
# ------------------------------------------------------------------------------

# ---- --preset gpu: the ladder question at full data, about 10 minutes on one GPU. ----
GPU_BUDGET_MINUTES = 10.0
# The authors ran GLUE at batch 8; one pass over SST-2 at 8 is 7,600 steps a run, so the batch
# is sized per task: every task starts at the first of these, and the task with the longest
# estimate moves to the next until the total fits the budget. Small tasks keep small batches.
GPU_BATCH_SIZES = (8, 16, 32, 64, 128)
CALIBRATION_STEPS = 20  # timed optimizer steps per task and method, after 3 untimed
DRY_RUN_ROWS = 48  # training rows per task in a dry run (and rows of val and test)
DRY_RUN_CALIBRATION_STEPS = 2  # a dry run's plan is rough: it only has to run
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},  # the defaults above
    "gpu": {
        "sections": "ladder",
        "ladder_tasks": "sst2,stsb,mrpc,cola",
        "ladder_seeds": "0,1,2",
        "train_rows": "all",
        "epochs": 1,
        "batch_size": None,  # sized per task from the step times measured on the device
        # caps the val hold-out (SST-2's is 6,735 rows); every dev set here is smaller: test whole
        "eval_rows": 2000,
        "train_eval_rows": 500,
        "group_by_length": True,  # batches of similar lengths: less padding at large batches
        "runs_dir": str(REPO / "runs/reproduce-gpu"),
        "output": str(REPO / "docs/results/reproduce-gpu.json"),
        "results_md": str(REPO / "docs/results-gpu.md"),
        "figure": str(REPO / "docs/ladder-gpu.png"),
    },
}

SCALE = 100  # scores are shown ×100, as in the paper's tables
# A score that guessing gets, for the tasks whose metric has one whatever the labels: MCC 0.
CHANCE = {"cola": 0.0}
NEAR_CHANCE = 0.1  # within 10 points of chance, every mean of a task is "near chance"
DIRECTIONS = tuple(OBJECTIVES.values())  # (score, retained params), as the search's front


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default="cpu",
        help="cpu: the documented reproduction; gpu: the ladder at full data, sized to a budget",
    )
    parser.add_argument("--sections", default=",".join(SECTIONS), help="sections to run")
    parser.add_argument("--tasks", default="mrpc,cola,stsb,sst2", help="Table 2's tasks")
    parser.add_argument("--seeds", default=",".join(map(str, TABLE2_SEEDS)), help="Table 2's seeds")
    parser.add_argument("--ladder-tasks", default=",".join(LADDER_TASKS))
    parser.add_argument("--ladder-ranks", default=",".join(map(str, LADDER_RANKS)))
    parser.add_argument("--ladder-xi-totals", default=",".join(map(str, LADDER_XI_TOTALS)))
    parser.add_argument("--ladder-seeds", default=",".join(map(str, LADDER_SEEDS)))
    parser.add_argument("--sensitivity-seeds", default=",".join(map(str, SENSITIVITY_SEEDS)))
    parser.add_argument("--r-max", type=int, default=R_MAX, help="SoRA's r_max, LoRA's rank")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epochs per run")
    parser.add_argument(
        "--train-rows",
        default=",".join(f"{k}={v}" for k, v in TRAIN_ROWS.items()),
        help="training rows per task, e.g. mrpc=500,stsb=700; all: the full training sets",
    )
    parser.add_argument(
        "--batch-size",
        default=str(TrialConfig.batch_size),
        help="training batch, or per task, e.g. sst2=128,mrpc=8 (gpu preset: sized unless given)",
    )
    parser.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="batch similar lengths together",
    )
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=GPU_BUDGET_MINUTES,
        help="gpu preset: the estimated total the batch size is sized to",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="gpu preset: measure and print the plan, then run the grid on a few rows per task",
    )
    parser.add_argument("--eval-rows", type=int, default=EVAL_ROWS, help="rows of val and test")
    parser.add_argument("--train-eval-rows", type=int, default=TRAIN_EVAL_ROWS)
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH, help="tokens per sequence")
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("SORA_TUNE_DATA_DIR") or str(REPO.parent / "shared/data/glue"),
        help="GLUE folder (default $SORA_TUNE_DATA_DIR or ../shared/data/glue)",
    )
    parser.add_argument("--model", default=None, help="backbone (default the packaged MiniLM)")
    parser.add_argument("--cache-dir", default=None, help="tokenisation cache")
    parser.add_argument("--runs-dir", default=str(REPO / "runs/reproduce"), help="run folders")
    parser.add_argument("--output", default=str(REPO / "docs/results/reproduce.json"))
    parser.add_argument("--results-md", default=str(REPO / "docs/results.md"))
    parser.add_argument("--figure", default=str(REPO / "docs/ladder.png"), help="the ladder plot")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--note", help="what else ran on the machine, shown with the wall time")
    parser.add_argument("--render-only", action="store_true", help="re-render from --output")
    preset = parser.parse_known_args(argv)[0].preset
    parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    if args.dry_run:
        if args.batch_size is not None:
            parser.error("--dry-run goes with --preset gpu and a sized batch (no --batch-size)")
        dry = Path(f"{args.runs_dir}-dry")  # never the real run's folder, page or figure
        args.runs_dir = str(dry / "runs")
        args.output, args.results_md = str(dry / "reproduce.json"), str(dry / "results.md")
        args.figure = str(dry / "ladder.png")
    return args


def _numbers(text: str, kind=int) -> list:
    return [kind(part) for part in text.split(",") if part.strip()]


def grid(args: argparse.Namespace) -> list[GridRun]:
    """Every run of the chosen sections, each once (a run two sections share is run once)."""
    rows = train_rows(args)

    def run(task: str, seed: int, **labels: Any) -> GridRun:
        settings = {k: v for k, v in labels.items() if k not in ("method", "r_max")}
        config = TrialConfig(
            task=task,
            data_dir=args.data_dir,
            model=args.model,
            method=labels["method"],
            r_max=labels["r_max"],
            epochs=args.epochs,
            max_length=args.max_length,
            max_train_samples=rows.get(task),
            max_eval_samples=args.eval_rows,
            train_eval_samples=args.train_eval_rows,
            batch_size=task_batch_size(args.batch_size, task),
            group_by_length=args.group_by_length,
            seed=seed,
            cache_dir=args.cache_dir,
            **settings,
        )
        return GridRun(config, {"task": task, **labels, "seed": seed})

    sections = set(args.sections.split(","))
    runs: list[GridRun] = []
    if "table2" in sections:
        for task in args.tasks.split(","):
            for seed in _numbers(args.seeds):
                for method in ("sora", "lora"):
                    runs.append(run(get_task(task).name, seed, method=method, r_max=args.r_max))
    if "ladder" in sections:
        for task in args.ladder_tasks.split(","):
            task = get_task(task).name
            for seed in _numbers(args.ladder_seeds):
                for rank in _numbers(args.ladder_ranks):
                    runs.append(run(task, seed, method="lora", r_max=rank))
                for xi_total in _numbers(args.ladder_xi_totals, float):
                    runs.append(run(task, seed, method="sora", r_max=args.r_max, xi_total=xi_total))
    if "sensitivity" in sections:
        for seed in _numbers(args.sensitivity_seeds):
            for xi in SENSITIVITY_XIS:
                for lam in SENSITIVITY_LAMS:
                    runs.append(run("stsb", seed, method="sora", r_max=args.r_max, xi=xi, lam=lam))
    if "clipping" in sections:
        for seed in _numbers(args.seeds):
            runs.append(
                run("stsb", seed, method="sora", r_max=args.r_max, max_grad_norm=CLIPPING_NORM)
            )
            runs.append(run("stsb", seed, method="sora", r_max=args.r_max))  # Table 2's
    return list({r.folder_name: r for r in runs}.values())


def train_rows(args: argparse.Namespace) -> dict[str, int]:
    """Training rows per task from `--train-rows`; a task left out trains on all its rows, as
    every task does with `all`."""
    if args.train_rows == "all":
        return {}
    return {get_task(k).name: int(v) for k, v in (p.split("=") for p in args.train_rows.split(","))}


def task_batch_size(batch_size: str, task: str) -> int:
    """A task's batch from `--batch-size`: one number for every task, or `task=number` pairs."""
    if "=" not in batch_size:
        return int(batch_size)
    return {get_task(k).name: int(v) for k, v in (p.split("=") for p in batch_size.split(","))}[
        task
    ]


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
        "device": device_name(default_device()),
        "note": note,
    }


# ---- Sizing (--preset gpu): measure on the device, then take the batch that fits ----


def plan_batch(args: argparse.Namespace) -> dict[str, Any]:
    """Each task's batch size for a sized run. Every task starts at the first of
    `GPU_BATCH_SIZES`; a trial's speed is measured on this device for each task, method and batch
    size reached, the grid's total is estimated from it, and while it exceeds `--budget-minutes`
    the task with the longest estimate takes the next batch size. A plan already in the runs
    folder is read back: the runs there were trained at its batch sizes."""
    path = Path(args.runs_dir) / "plan.json"
    if path.exists():
        print(f"plan read back from {path}")
        return json.loads(path.read_text())
    device = default_device()
    steps, warmup = (DRY_RUN_CALIBRATION_STEPS, 1) if args.dry_run else (CALIBRATION_STEPS, 3)
    tasks = [get_task(t).name for t in args.ladder_tasks.split(",")]
    sizes = dict.fromkeys(tasks, GPU_BATCH_SIZES[0])
    data: dict[str, Any] = {}
    prepare_s: dict[str, float] = {}
    speeds: dict[tuple[str, str, int], TrialSpeed] = {}
    tried = []
    while True:
        runs = grid(argparse.Namespace(**vars(args) | {"batch_size": batch_sizes_text(sizes)}))
        measured = measured_configs(runs)
        for (task, method), config in measured.items():
            if task not in data:
                began = time.perf_counter()
                data[task] = prepare_data(config)
                prepare_s[task] = time.perf_counter() - began
            if (task, method, config.batch_size) not in speeds:
                print(f"measuring {task} {method} at batch {config.batch_size}", flush=True)
                speeds[task, method, config.batch_size] = measure_speed(
                    config, data[task], steps=steps, warmup=warmup, device=device
                )
        current = {(task, method): speeds[task, method, sizes[task]] for task, method in measured}
        estimates = estimate_seconds(runs, current, prepare_s)
        tried.append(
            {
                "batch_sizes": dict(sizes),
                "estimate_s": sum(estimates.values()),
                "tasks": estimates,
                "speeds": current,
            }
        )
        growable = [t for t in tasks if sizes[t] < GPU_BATCH_SIZES[-1]]
        if tried[-1]["estimate_s"] <= 60 * args.budget_minutes or not growable:
            break
        slowest = max(growable, key=estimates.get)
        sizes[slowest] = GPU_BATCH_SIZES[GPU_BATCH_SIZES.index(sizes[slowest]) + 1]
    # The first that fits; when none does (a larger batch need not be faster per row on every
    # device), the lowest estimate.
    fits = tried[-1]["estimate_s"] <= 60 * args.budget_minutes
    chosen = tried[-1] if fits else min(tried, key=lambda t: t["estimate_s"])
    return {
        "device": device_name(device),
        "batch_size": batch_sizes_text(chosen["batch_sizes"]),
        "budget_s": 60 * args.budget_minutes,
        "estimate_s": chosen["estimate_s"],
        "fits": fits,
        "tried": [{k: t[k] for k in ("batch_sizes", "estimate_s")} for t in tried],
        "calibration_steps": steps,
        "tasks": {
            task: {
                "batch_size": chosen["batch_sizes"][task],
                "train_rows": len(data[task]["train"]),
                "prepare_s": prepare_s[task],
                "estimate_s": estimate,
            }
            | {
                f"{method}_{key}": getattr(chosen["speeds"][task, method], key)
                for method in ("lora", "sora")
                for key in ("setup_s", "step_s", "eval_row_s", "steps_per_epoch", "eval_rows")
                if (task, method) in chosen["speeds"]
            }
            for task, estimate in chosen["tasks"].items()
        },
    }


def batch_sizes_text(sizes: dict[str, int]) -> str:
    """Per-task batch sizes as `--batch-size` takes them."""
    return ",".join(f"{task}={size}" for task, size in sizes.items())


def measured_configs(runs: list[GridRun]) -> dict[tuple[str, str], TrialConfig]:
    """What is measured for each task and method of a grid: its first seed's largest adapter."""
    chosen: dict[tuple[str, str], TrialConfig] = {}
    first_seed = min(run.config.seed for run in runs)
    for run in runs:
        key = (run.labels["task"], run.config.method)
        if run.config.seed == first_seed and run.config.r_max > getattr(
            chosen.get(key), "r_max", 0
        ):
            chosen[key] = run.config
    return chosen


def estimate_seconds(
    runs: list[GridRun], speeds: dict[tuple[str, str], TrialSpeed], prepare_s: dict[str, float]
) -> dict[str, float]:
    """Estimated seconds per task of a grid: each run builds its model, trains its steps and
    scores at each evaluation at the measured speeds; the data are prepared once per seed."""
    total: dict[str, float] = {}
    for run in runs:
        task, config = run.labels["task"], run.config
        speed = speeds[task, config.method]
        evaluations = len(config.evaluation_steps(speed.steps_per_epoch))
        total[task] = total.get(task, 0.0) + (
            speed.setup_s
            + config.epochs * speed.steps_per_epoch * speed.step_s
            + evaluations * speed.eval_rows * speed.eval_row_s
        )
    for task in total:
        seeds = {run.config.seed for run in runs if run.labels["task"] == task}
        total[task] += len(seeds) * prepare_s[task]
    return total


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def print_plan(plan: dict[str, Any], runs: int) -> None:
    print(
        f"plan on {plan['device']}: {runs} runs, estimated "
        f"{plan['estimate_s'] / 60:.1f} min against a budget of {plan['budget_s'] / 60:g} min"
    )
    print(
        f"{'task':<8}{'batch':>7}{'train rows':>12}{'steps/epoch':>13}{'s/step lora':>13}"
        f"{'s/step sora':>13}{'est. min':>10}"
    )
    for task, entry in plan["tasks"].items():
        print(
            f"{task:<8}{entry['batch_size']:>7}{entry['train_rows']:>12,}"
            f"{entry['sora_steps_per_epoch']:>13,}"
            f"{entry['lora_step_s']:>13.4f}{entry['sora_step_s']:>13.4f}"
            f"{entry['estimate_s'] / 60:>10.1f}"
        )


def dry_run_sizes(args: argparse.Namespace) -> argparse.Namespace:
    """The sized grid on `DRY_RUN_ROWS` rows per task: every part runs, in seconds."""
    tasks = args.ladder_tasks.split(",")
    return argparse.Namespace(
        **vars(args)
        | {
            "train_rows": ",".join(f"{task}={DRY_RUN_ROWS}" for task in tasks),
            "eval_rows": DRY_RUN_ROWS,
            "train_eval_rows": DRY_RUN_ROWS // 2,
        }
    )


# ---- Analysis: every number of the page is computed here, from the rows ----


def _select(rows: list[dict], **match: Any) -> list[dict]:
    return [
        r
        for r in rows
        if r["status"] == "finished"
        and all(r.get(k) == v for k, v in match.items())
        and all(
            r.get(k) is None for k in ("xi", "lam", "xi_total", "max_grad_norm") if k not in match
        )
    ]


def _summary(rows: list[dict]) -> dict[str, Any]:
    test, val = mean_std([r["test_score"] for r in rows]), mean_std([r["val_score"] for r in rows])
    params = mean_std([r["retained_params"] for r in rows])
    return {
        "seeds": len(rows),
        "test": test,
        "val": val,
        "params": params,
        "train_time_s": mean_std([r["train_time_s"] for r in rows])[0],
    }


def analyse_table2(rows: list[dict], tasks: list[str], r_max: int) -> dict[str, Any]:
    groups, deltas = [], []
    for task in tasks:
        for method in ("sora", "lora"):
            groups.append(
                {"task": task, "method": method}
                | _summary(_select(rows, task=task, method=method, r_max=r_max))
            )
        differences = {
            split: paired_deltas(
                _select(rows, task=task, r_max=r_max),
                pair_by="seed",
                a={"method": "sora"},
                b={"method": "lora"},
                key=f"{split}_score",
            )
            for split in ("test", "val")
        }
        deltas.append(
            {"task": task, "r_max": r_max, "pairs": len(differences["test"])}
            | {split: mean_std(values) for split, values in differences.items()}
        )
    average = {
        method: mean_std(
            [g["test"][0] for g in groups if g["method"] == method and g["test"][0] is not None]
        )[0]
        for method in ("sora", "lora")
    }
    return {"groups": groups, "deltas": deltas, "average": average}


def _front_points(summaries: list[dict], key: str) -> np.ndarray:
    return np.array([[s[key][0], s["params"][0]] for s in summaries if s[key][0] is not None])


def analyse_ladder(rows: list[dict], args_ns: dict) -> dict[str, Any]:
    """Per task: every LoRA rank and SoRA ξ_total, mean ± std over seeds; where each SoRA point
    lies against the LoRA ladder; the hypervolume of both fronts with one reference point."""
    result = {}
    for task in args_ns["ladder_tasks"]:
        lora = [
            {"label": f"LoRA r={rank}", "r": rank}
            | _summary(_select(rows, task=task, method="lora", r_max=rank))
            for rank in args_ns["ladder_ranks"]
        ]
        sora = [
            {"label": f"SoRA xi_total={x:g}", "xi_total": x}
            | _summary(_select(rows, task=task, method="sora", r_max=args_ns["r_max"], xi_total=x))
            for x in args_ns["ladder_xi_totals"]
        ]
        lora = [p for p in lora if p["seeds"]]
        sora = [p for p in sora if p["seeds"]]
        if not lora or not sora:
            continue
        ladder = sorted((p["params"][0], p["test"][0], p["test"][1] or 0.0) for p in lora)
        for point in sora:
            point["vs_ladder"] = _against_ladder(point, ladder)
        # One reference for both fronts: score 0 (chance for correlations, below any accuracy
        # here) and 10% beyond the largest adapter of either.
        reference = (0.0, 1.1 * max(p["params"][0] for p in lora + sora))
        volumes = {}
        for name, points in (("lora", lora), ("sora", sora), ("both", lora + sora)):
            for key in ("test", "val"):
                values = _front_points(points, key)
                volumes[f"{name}_{key}"] = hypervolume(values, DIRECTIONS, reference)
        front = is_pareto_front(_front_points(lora + sora, "test"), DIRECTIONS)
        result[task] = {
            "lora": lora,
            "sora": sora,
            "reference": reference,
            "hypervolume": volumes,
            "front": [p["label"] for p, on in zip(lora + sora, front, strict=True) if on],
        }
    return result


def _against_ladder(point: dict, ladder: list[tuple[float, float, float]]) -> dict[str, Any]:
    """The LoRA ladder's test score at the point's parameter count (interpolated in log params,
    its spread likewise), and whether the point is above, on or below it: on when the difference
    is within the two spreads combined."""
    params = [p for p, _, _ in ladder]
    x = math.log(point["params"][0])
    logs = [math.log(p) for p in params]
    score = float(np.interp(x, logs, [s for _, s, _ in ladder]))
    spread = float(np.interp(x, logs, [d for _, _, d in ladder]))
    delta = point["test"][0] - score
    margin = math.hypot(spread, point["test"][1] or 0.0)
    where = "on" if abs(delta) <= margin else ("above" if delta > 0 else "below")
    outside = not params[0] <= point["params"][0] <= params[-1]
    return {
        "ladder_score": score,
        "delta": delta,
        "margin": margin,
        "where": where,
        "extrapolated": outside,
    }


def analyse_sensitivity(rows: list[dict], r_max: int) -> dict[str, Any]:
    cells = {}
    for xi in SENSITIVITY_XIS:
        for lam in SENSITIVITY_LAMS:
            cells[f"{xi:g},{lam:g}"] = {"xi": xi, "lam": lam} | _summary(
                _select(rows, task="stsb", method="sora", r_max=r_max, xi=xi, lam=lam)
            )
    scores = [c["test"][0] for c in cells.values() if c["test"][0] is not None]
    return {"cells": cells, "range": (min(scores), max(scores)) if scores else None}


def analyse_clipping(rows: list[dict], r_max: int) -> dict[str, Any]:
    stsb = _select(rows, task="stsb", method="sora", r_max=r_max) + _select(
        rows, task="stsb", method="sora", r_max=r_max, max_grad_norm=CLIPPING_NORM
    )
    deltas = {
        key: paired_deltas(
            stsb,
            pair_by="seed",
            a={"max_grad_norm": None},
            b={"max_grad_norm": CLIPPING_NORM},
            key=key,
        )
        for key in ("test_score", "val_score")
    }
    return {
        "pairs": len(deltas["test_score"]),
        "test": mean_std(deltas["test_score"]),
        "val": mean_std(deltas["val_score"]),
    }


def analyse(rows: list[dict], settings: dict) -> dict[str, Any]:
    """The sections run (a run one section shares with another must not make a table of it)."""
    analyses = {
        "table2": lambda: analyse_table2(rows, settings["tasks"], settings["r_max"]),
        "ladder": lambda: analyse_ladder(rows, settings),
        "sensitivity": lambda: analyse_sensitivity(rows, settings["r_max"]),
        "clipping": lambda: analyse_clipping(rows, settings["r_max"]),
    }
    return {name: analyses[name]() for name in SECTIONS if name in settings["sections"]}


# ---- Rendering ----


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _score(stat: tuple[float | None, float | None] | list, *, sign: bool = False) -> str:
    mean, std = stat
    if mean is None:
        return "–"
    text = f"{SCALE * mean:+.1f}" if sign else f"{SCALE * mean:.1f}"
    return f"{text} ± {'n/a' if std is None else f'{SCALE * std:.1f}'}"


def _params(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def plot_ladder(ladder: dict[str, Any], path: Path) -> None:
    """Test score against retained parameters: the LoRA ladder as a line, SoRA points by
    xi_total, mean ± std over seeds."""
    fig = Figure(figsize=(5 * max(1, len(ladder)), 4), layout="constrained")
    axes = fig.subplots(1, max(1, len(ladder)), squeeze=False)[0]
    for ax, (task, entry) in zip(axes, ladder.items(), strict=False):
        for name, points, style in (
            ("LoRA ladder", entry["lora"], "o-"),
            ("SoRA by xi_total", entry["sora"], "s"),
        ):
            x = [p["params"][0] for p in points]
            y = [SCALE * p["test"][0] for p in points]
            err = [SCALE * (p["test"][1] or 0.0) for p in points]
            ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label=name)
        for p in entry["sora"]:
            ax.annotate(
                f"{p['xi_total']:g}",
                (p["params"][0], SCALE * p["test"][0]),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
            )
        for p in entry["lora"]:
            ax.annotate(
                f"r={p['r']}",
                (p["params"][0], SCALE * p["test"][0]),
                fontsize=7,
                xytext=(4, -10),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        ax.set_xlabel("retained adapter parameters")
        ax.set_ylabel(f"{task} test score ×{SCALE} ({get_task(task).primary})")
        ax.set_title(f"{task}: SoRA labelled by xi_total")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def render_markdown(result: dict, md_path: Path, json_path: Path) -> str:
    """`docs/results.md` from the JSON alone; links relative to `md_path`."""
    settings, analysis, machine = result["settings"], result["analysis"], result["machine"]
    output = os.path.relpath(json_path.resolve(), md_path.resolve().parent)
    rows = result["rows"]
    reused = sum(r["reused"] for r in rows)
    defaults = (
        "Defaults: as the authors' code runs them, the gates' AdamW learning rate is the trial's "
        "(8e-4), on the same warm-up and decay, and gradients are clipped at 0.1; from the "
        "paper's text (Tables 7 and 6), λ = 0.1 (weight of mean|g|) and ξ = "
        f"{DEFAULT_XI:g} where not searched. The authors' GLUE script "
        "(`run_glue_sora_no_schedule.sh`) passes λ 10 and ξ 3e-4"
    )
    if settings.get("preset", "cpu") == "cpu":
        lines = [
            "# Reproduction at CPU scale: SoRA against LoRA, and what SoRA buys",
            "",
            f"Generated by `scripts/reproduce.py` from [`{output}`]({output}); do not edit by hand.",
            "",
            f"**A CPU-sized run, not the paper's setting**: {settings['model_name']} instead of "
            f"DeBERTaV3-base, {min(settings['train_rows'].values())}–{max(settings['train_rows'].values())} "
            f"training rows per task, {settings['epochs']} epoch(s), batch 8, length {settings['max_length']}, "
            "no per-task tuning. Scores ×100 on GLUE dev (the trials' `test_score`; `val` is held out "
            "of the training file), as mean ± sample std over seeds; numbers as they came out.",
            "",
            defaults + "; the sensitivity grid below runs λ 10, and ξ from 1e-5 to 1e-3.",
            "",
        ]
    else:
        lines = _sized_scope(result, output) + [defaults + ".", ""]
    lines += [
        "## Command and machine",
        "",
        f"`{result['command']}`",
        "",
        f"{machine['platform']}, {machine['cpu_model']}, {machine['cpus']} CPUs, "
        f"{machine['torch_threads']} torch threads, torch {machine['torch']}"
        + (f", {machine['device']}" if machine.get("device", "cpu") != "cpu" else "")
        + f"; {machine['note']}.",
        "",
        f"Wall time of this invocation: {result['wall_s'] / 60:.1f} min for {len(rows)} runs"
        + (f" ({reused} read back from earlier invocations)" if reused else "")
        + f"; training and scoring summed over the runs: "
        f"{sum(r['train_time_s'] or 0 for r in rows) / 60:.1f} min.",
    ]
    if "table2" in analysis:
        lines += _render_table2(analysis["table2"])
    if "ladder" in analysis:
        lines += _render_ladder(analysis["ladder"], result.get("figure"), settings["r_max"])
    if "sensitivity" in analysis:
        lines += _render_sensitivity(analysis["sensitivity"], settings["r_max"])
    if "clipping" in analysis:
        lines += _render_clipping(analysis["clipping"])
    return "\n".join(lines) + "\n"


def _sized_scope(result: dict, output: str) -> list[str]:
    """The head of a `--preset gpu` page: what ran, and the plan it was sized by."""
    settings, plan = result["settings"], result["plan"]
    tasks = ", ".join(settings["ladder_tasks"])
    lines = [
        "# The LoRA ladder against SoRA at full data, on one GPU"
        + (" (dry run)" if settings["dry_run"] else ""),
        "",
        f"Generated by `scripts/reproduce.py` from [`{output}`]({output}); do not edit by hand.",
        "",
    ]
    if settings["dry_run"]:
        lines += [
            f"**A dry run**: the grid of `--preset gpu` on {DRY_RUN_ROWS} training rows per task, "
            "so its scores mean nothing; it shows that every part runs, and the plan the full "
            f"run would take on {plan['device']}.",
            "",
        ]
    else:
        lines += [
            f"**The full training sets, {settings['epochs']} pass(es)**: {settings['model_name']} "
            f"on {tasks}, each training file less a seeded {100 * TrialConfig.val_size:g}% held "
            f"out as `val` (at most {settings['eval_rows']:,} rows), batch sized per task "
            f"(below), length {settings['max_length']}"
            + (", batches grouped by length" if settings["group_by_length"] else "")
            + f", precision auto (bf16 where native), lr {TrialConfig.lr:g} at every batch size, no per-task "
            "tuning. Scores ×100 on GLUE dev (the trials' `test_score`), as mean ± sample std "
            "over seeds; numbers as they came out.",
            "",
        ]
    lines += [
        f"**Sized on {plan['device']}**: step and scoring times measured first "
        f"({plan['calibration_steps']} steps per task, method and batch size); every task "
        f"started at batch {GPU_BATCH_SIZES[0]}, and the task with the longest estimate took the "
        f"next of {', '.join(map(str, GPU_BATCH_SIZES))}, until the total fit "
        f"{plan['budget_s'] / 60:g} min or every task was at the largest: "
        f"{len(plan['tried'])} step(s), from "
        f"{plan['tried'][0]['estimate_s'] / 60:.1f} to {plan['tried'][-1]['estimate_s'] / 60:.1f} min"
        + ("" if plan["fits"] else "; none fitted, and the lowest estimate was taken")
        + ". By task:",
        "",
        *_table(
            [
                "task",
                "batch",
                "train rows",
                "steps/epoch",
                "s/step LoRA",
                "s/step SoRA",
                "estimated min",
            ],
            [
                [
                    task,
                    str(entry["batch_size"]),
                    f"{entry['train_rows']:,}",
                    f"{entry['sora_steps_per_epoch']:,}",
                    f"{entry['lora_step_s']:.4f}",
                    f"{entry['sora_step_s']:.4f}",
                    f"{entry['estimate_s'] / 60:.1f}",
                ]
                for task, entry in plan["tasks"].items()
            ],
        ),
        "",
    ]
    return lines


def _render_table2(table2: dict) -> list[str]:
    if not any(g["seeds"] for g in table2["groups"]):
        return []
    lines = [
        "",
        f"## Table 2's shape: SoRA against LoRA at r_max {table2['deltas'][0]['r_max']}",
        "",
        *_table(
            ["task", "method", "seeds", "test", "val", "retained params"],
            [
                [
                    g["task"],
                    g["method"],
                    str(g["seeds"]),
                    _score(g["test"]),
                    _score(g["val"]),
                    _params(g["params"][0]),
                ]
                for g in table2["groups"]
            ],
        ),
        "",
        "SoRA − LoRA, paired by seed (mean ± std of the per-seed differences):",
        "",
        *_table(
            ["task", "pairs", "Δ test", "Δ val"],
            [
                [
                    d["task"],
                    str(d["pairs"]),
                    _score(d["test"], sign=True),
                    _score(d["val"], sign=True),
                ]
                for d in table2["deltas"]
            ],
        ),
        "",
    ]
    better = [d for d in table2["deltas"] if d["test"][0] is not None and d["test"][0] > 0]
    beyond = [d for d in table2["deltas"] if d["test"][1] and abs(d["test"][0]) > d["test"][1]]
    average = table2["average"]
    lines.append(
        f"SoRA's mean test score is higher in {len(better)} of {len(table2['deltas'])} tasks; the "
        f"difference exceeds its spread in {len(beyond)} ({', '.join(d['task'] for d in beyond) or 'none'}). "
        + (
            f"Average over the tasks: SoRA {SCALE * average['sora']:.1f}, LoRA {SCALE * average['lora']:.1f}."
            if None not in average.values()
            else ""
        )
    )
    return lines + _caveats(table2)


def _caveats(table2: dict) -> list[str]:
    """What a reader of a task's test difference must also know: a val difference of the other
    sign, and scores near chance."""
    lines = []
    for d in table2["deltas"]:
        test, val = d["test"][0], d["val"][0]
        if test is not None and val is not None and test * val < 0:
            lines.append(
                f"In {d['task']}, the val difference goes the other way: {_score(d['val'], sign=True)} "
                f"against {_score(d['test'], sign=True)} on test."
            )
    for task, chance in CHANCE.items():
        means = [
            g[split][0] for g in table2["groups"] if g["task"] == task for split in ("test", "val")
        ]
        if means and None not in means and max(abs(m - chance) for m in means) < NEAR_CHANCE:
            lines.append(
                f"{task}'s scores sit near chance (a guess scores {SCALE * chance:.0f}) at this "
                f"scale: every mean is within {SCALE * max(abs(m - chance) for m in means):.1f} "
                "points of it."
            )
    return ["", " ".join(lines)] if lines else []


def _render_ladder(ladder: dict, figure: str | None, r_max: int) -> list[str]:
    if not ladder:
        return []
    lines = [
        "",
        "## Does SoRA buy a smaller adapter at the same score?",
        "",
        f"The LoRA rank ladder against SoRA at r_max {r_max} with `xi_total` (ξ × gate steps: how much a "
        "gate can shrink over the trial), seeds as in the table. *Where* compares a SoRA point with "
        "the ladder's test score at the same parameter count (interpolated in log params): *on* "
        "when the difference is within the two spreads combined.",
    ]
    if figure:
        lines += ["", f"![Test score against retained parameters]({figure})"]
    for task, entry in ladder.items():
        lines += [
            "",
            f"### {task}",
            "",
            *_table(
                ["adapter", "seeds", "retained params", "test", "val", "vs the LoRA ladder"],
                [
                    [
                        p["label"],
                        str(p["seeds"]),
                        _params(p["params"][0]),
                        _score(p["test"]),
                        _score(p["val"]),
                        "–",
                    ]
                    for p in entry["lora"]
                ]
                + [
                    [
                        p["label"],
                        str(p["seeds"]),
                        _params(p["params"][0]),
                        _score(p["test"]),
                        _score(p["val"]),
                        f"{p['vs_ladder']['where']} ({SCALE * p['vs_ladder']['delta']:+.1f} ± {SCALE * p['vs_ladder']['margin']:.1f}"
                        + (", beyond the ladder's ends" if p["vs_ladder"]["extrapolated"] else "")
                        + ")",
                    ]
                    for p in entry["sora"]
                ],
            ),
        ]
    lines += [
        "",
        "Hypervolume of each front (score × parameters dominated, of the per-configuration means), "
        "with one reference point per task: score 0 and 1.1 × the largest adapter.",
        "",
        *_table(
            [
                "task",
                "reference params",
                "LoRA (test)",
                "SoRA (test)",
                "both (test)",
                "LoRA (val)",
                "SoRA (val)",
                "front (test)",
            ],
            [
                [
                    task,
                    _params(entry["reference"][1]),
                    *[
                        f"{entry['hypervolume'][f'{m}_test']:,.0f}"
                        for m in ("lora", "sora", "both")
                    ],
                    *[f"{entry['hypervolume'][f'{m}_val']:,.0f}" for m in ("lora", "sora")],
                    ", ".join(entry["front"]),
                ]
                for task, entry in ladder.items()
            ],
        ),
        "",
    ]
    for task, entry in ladder.items():
        counts = {
            w: sum(p["vs_ladder"]["where"] == w for p in entry["sora"])
            for w in ("above", "on", "below")
        }
        hv = entry["hypervolume"]
        share = f"{100 * hv['sora_test'] / hv['lora_test']:.0f}%" if hv["lora_test"] else "n/a"
        lines.append(
            f"- {task}: of {len(entry['sora'])} SoRA points, {counts['above']} lie above the LoRA "
            f"ladder, {counts['on']} on it and {counts['below']} below; SoRA's front has {share} "
            "of the LoRA ladder's hypervolume (test)."
        )
    return lines


def _render_sensitivity(sensitivity: dict, r_max: int) -> list[str]:
    if sensitivity["range"] is None:
        return []
    cells = sensitivity["cells"]
    low, high = sensitivity["range"]
    return [
        "",
        "## Sensitivity to ξ and λ (Tables 6 and 7)",
        "",
        f"STS-B, SoRA at r_max {r_max}, {_seed_count(cells.values())} seeds per cell: test score "
        "(retained parameters) per ξ (rows) and λ (columns). "
        "The paper's η_t of Table 7 is λ here, the weight of mean|g| (the authors' "
        "`--sparse_lambda`).",
        "",
        *_table(
            ["ξ \\ λ", *[f"{lam:g}" for lam in SENSITIVITY_LAMS]],
            [
                [f"{xi:g}"]
                + [
                    f"{_score(cells[f'{xi:g},{lam:g}']['test'])} ({_params(cells[f'{xi:g},{lam:g}']['params'][0])})"
                    for lam in SENSITIVITY_LAMS
                ]
                for xi in SENSITIVITY_XIS
            ],
        ),
        "",
        f"Mean test scores range over {SCALE * (high - low):.1f} points ({SCALE * low:.1f} to {SCALE * high:.1f}).",
    ]


def _seed_count(summaries) -> str:
    """The seeds of a set of summaries: `2`, or `2–3` when they differ."""
    counts = sorted({s["seeds"] for s in summaries})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def _render_clipping(clipping: dict) -> list[str]:
    if not clipping["pairs"]:
        return []
    return [
        "",
        "## Gradient clipping: the authors' 0.1 against 1.0",
        "",
        f"STS-B, SoRA, {clipping['pairs']} seeds: clip 0.1 − clip 1.0 = {_score(clipping['test'], sign=True)} "
        f"(test), {_score(clipping['val'], sign=True)} (val); 0.1 is the default, as the authors "
        "ran it.",
    ]


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    output, md_path, figure = Path(args.output), Path(args.results_md), Path(args.figure)
    if args.render_only:
        result = json.loads(output.read_text())
        if args.note is not None:
            result["machine"]["note"] = args.note
            output.write_text(json.dumps(result, indent=2))
        if result.get("figure"):
            plot_ladder(result["analysis"]["ladder"], figure)
        md_path.write_text(render_markdown(result, md_path, output))
        print(f"wrote {md_path}")
        return result

    torch.set_num_threads(args.threads)
    for name in ("data_dir", "runs_dir"):
        setattr(args, name, str(Path(getattr(args, name)).resolve()))
    start = time.perf_counter()

    def progress(index: int, total: int, row: dict) -> None:
        took = "read back" if row["reused"] else f"{row['train_time_s'] or 0:.0f} s"
        print(
            f"[{index}/{total}] {Path(row['folder']).name}: {row['status']}, test "
            f"{SCALE * (row['test_score'] or 0):.1f}, {_params(row['retained_params'])} params, {took}",
            flush=True,
        )

    plan = None
    if args.batch_size is None:
        plan = plan_batch(args)
        print_plan(
            plan, len(grid(argparse.Namespace(**vars(args) | {"batch_size": plan["batch_size"]})))
        )
        if not plan["fits"] and not args.dry_run:
            sys.exit(
                f"reproduce.py: the lowest estimate, {plan['estimate_s'] / 60:.0f} min at batch "
                f"{plan['batch_size']}, exceeds --budget-minutes "
                f"{args.budget_minutes:g} on {plan['device']}; give a larger budget to run it"
            )
        Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.runs_dir) / "plan.json").write_text(json.dumps(plan, indent=2))
        args.batch_size = plan["batch_size"]
        if args.dry_run:
            args = dry_run_sizes(args)

    rows = run_grid(grid(args), args.runs_dir, on_run=progress)
    settings = {
        "preset": args.preset,
        "dry_run": args.dry_run,
        "sections": [name for name in SECTIONS if name in args.sections.split(",")],
        "tasks": [get_task(t).name for t in args.tasks.split(",")],
        "r_max": args.r_max,
        "epochs": args.epochs,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "group_by_length": args.group_by_length,
        "eval_rows": args.eval_rows,
        "train_rows": train_rows(args),
        "ladder_tasks": [get_task(t).name for t in args.ladder_tasks.split(",")],
        "ladder_ranks": _numbers(args.ladder_ranks),
        "ladder_xi_totals": _numbers(args.ladder_xi_totals, float),
        "model_name": "the packaged all-MiniLM-L6-v2" if args.model is None else f"`{args.model}`",
    }
    result = {
        "command": shlex.join(["python", "scripts/reproduce.py", *argv]),
        "machine": machine_info(args.threads, args.note or "other jobs may have shared the CPU"),
        "settings": settings,
        "plan": plan,
        "rows": [r | {"folder": os.path.relpath(r["folder"], args.runs_dir)} for r in rows],
        "analysis": analyse(rows, settings),
        "wall_s": time.perf_counter() - start,
        # relative to the page, which links it: generated docs name no machine paths
        "figure": os.path.relpath(figure.resolve(), md_path.resolve().parent)
        if "ladder" in args.sections
        else None,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    if result["figure"]:
        plot_ladder(result["analysis"]["ladder"], figure)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(render_markdown(result, md_path, output))
    print(f"wrote {output}, {md_path}")
    return result


if __name__ == "__main__":
    main()
