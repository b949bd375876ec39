"""Recorded learning curves: a space-filling design over a search space, each configuration
trained with a few seeds on a cheap proxy, every evaluation kept (issue #28 §2). Searches can
then be replayed on a simulated clock by looking their trials up in the table, and the table
says whether early scores rank trials as the final ones do (`rank_correlations`), which early
stopping needs.

The table is JSON Lines: a first line with the design (`{"design": ..., "started": ...}`), then
one line per finished trial: its searched values, its evaluations (step, epoch, the wall time of
the interval since the one before, val_score, test_score, retained_params) and, for SoRA, the
points that post-hoc gate thresholds give (`GateThresholds`). A line is added by writing the
whole file beside it and moving it in, so a kill never leaves half a line. A restart skips the
recorded trials and runs an interrupted one again from its start, so that every curve and its
times come from one uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import DatasetDict
from scipy.stats import qmc, spearmanr

from .config import PATH_FIELDS, TrialConfig
from .experiments import GridRun, PreparedData
from .front import OBJECTIVES
from .models import build_model, load_tokenizer
from .sora import gate_quantiles, gates_thresholded, load_adapter, retained_params
from .train import (
    data_task,
    evaluate,
    make_loaders,
    resolve_device,
    resolve_precision,
    train_trial,
)
from .tune.space import SearchSpace

# The STS-B proxy of the search benchmark (scripts/bench_hypervolume.py: batches of 8 rows,
# length 64, 100 val and 100 test rows, 32 training rows scored) with 3× its 200 training rows,
# so that its 2 epochs are 150 optimizer steps (issue #28: at least 150), scored every 15 steps
# (issue #28: every 10-25): 10 evaluations a trial.
PROXY: dict[str, Any] = {
    "task": "stsb",
    "max_train_samples": 600,
    "max_eval_samples": 100,
    "train_eval_samples": 32,
    "max_length": 64,
    "batch_size": 8,
    "epochs": 2,
    "eval_steps": 15,
}
# Each threshold is a quantile of the non-zero |g|, so it zeroes about that share of the ranks
# the trial still keeps: 4 points per scoring (issue #28: 3-5), spread over the trial's own gates.
THRESHOLD_QUANTILES = (0.2, 0.4, 0.6, 0.8)
# Thresholds at every 5th evaluation and at the last: on the proxy, at the end of each epoch.
THRESHOLD_EVERY = 5
# A rank correlation below this is called low: the early ranking then accounts for less than a
# quarter of the variance of the final ranks (ρ² < 0.25).
LOW_CORRELATION = 0.5


def from_unit(spec: dict[str, Any], u: float) -> Any:
    """The value of a search-space distribution (`SearchSpace.distributions`) at `u` in [0, 1):
    uniform on the log scale for `loguniform` and `int` with `log`, each choice an equal share."""
    kind = spec["type"]
    if kind == "choice":
        values = spec["values"]
        return values[min(int(u * len(values)), len(values) - 1)]
    low, high = spec["low"], spec["high"]
    upper = high + 1 if kind == "int" else high  # whole numbers: high included, as Ray draws them
    if kind == "loguniform" or spec.get("log"):
        value = math.exp(math.log(low) + u * (math.log(upper) - math.log(low)))
    else:
        value = low + u * (upper - low)
    return min(int(value), high) if kind == "int" else float(value)


def to_unit(spec: dict[str, Any], value: Any) -> float:
    """Where `value` sits in [0, 1] for the distribution `spec`: `from_unit`'s inverse, so that
    settings are compared on the scale the design filled. A choice or a whole number is the
    middle of its share; a number is clipped into its range."""
    kind = spec["type"]
    if kind == "choice":
        return (spec["values"].index(value) + 0.5) / len(spec["values"])
    if kind == "int":  # `from_unit` floors: the share of v is [v, v + 1) on the scale
        return (_scaled(spec, value) + _scaled(spec, value + 1)) / 2
    return min(max(_scaled(spec, value), 0.0), 1.0)


def _scaled(spec: dict[str, Any], value: float) -> float:
    """`value`'s place between low and high (high + 1 for whole numbers), on the spec's scale."""
    low, upper = spec["low"], spec["high"] + 1 if spec["type"] == "int" else spec["high"]
    if spec["type"] == "loguniform" or spec.get("log"):
        return (math.log(value) - math.log(low)) / (math.log(upper) - math.log(low))
    return (value - low) / (upper - low)


def design(space: SearchSpace, configurations: int, *, seed: int) -> list[dict[str, Any]]:
    """`configurations` settings of the searched parameters of `space`: a Latin hypercube
    (scipy's, scrambled and seeded, its centred discrepancy lowered by swaps within columns,
    which keep it a Latin hypercube). Every parameter takes each 1/n-th of its range once, on
    its own scale; a choice's values come equally often when n is a multiple of their number."""
    names = sorted(space.distributions)  # an order that does not depend on the YAML's
    sampler = qmc.LatinHypercube(d=len(names), optimization="random-cd", rng=seed)
    return [
        {
            name: from_unit(space.distributions[name], float(u))
            for name, u in zip(names, row, strict=True)
        }
        for row in sampler.random(configurations)
    ]


def design_runs(
    space: SearchSpace, configurations: int, seeds: Sequence[int], *, design_seed: int
) -> list[GridRun]:
    """Every trial of the design, configuration after configuration, each with every seed (a
    table cut short holds whole configurations). Labelled `config` (its index) and `seed`."""
    return [
        GridRun(
            TrialConfig.from_dict(space.fixed | point | {"seed": seed}),
            {"config": index, "seed": seed},
        )
        for index, point in enumerate(design(space, configurations, seed=design_seed))
        for seed in seeds
    ]


# §4's option (a), a front-tracing trial that trains on through its stages: the constant trial's
# budget at its own ξ per gate step (its xi_total over those steps), then 3 stages that share one
# more epoch (on the proxy, 150 steps, then 3 stages of 25), ξ per gate step rising linearly to
# the last stage's, which can take up to STAGED_LAST_TOTAL off a gate over its steps, with the
# learning rate decaying once over the whole trial (`stage_lr continue`). On the proxy the stages
# can take about 0.15-0.3, 0.3-0.4 and 0.45 over the design's xi_total, as deep as the post-hoc
# thresholds reach on the recorded trials (their 0.2-0.8 quantiles of |g| measured 0.1-1.3).
STAGED_LAST_TOTAL = 0.45
STAGED = {"xi_schedule": "linear", "xi_stages": 4, "stage_lr": "continue"}


def staged_run(run: GridRun, steps_per_epoch: int) -> GridRun:
    """`run`'s constant trial as option (a): its whole budget as the dense phase, then the
    stages of `STAGED` in one more epoch of `steps_per_epoch` steps (at least one step each).

    Raises:
        ValueError: an epoch shorter than the stages.
    """
    constant = run.config
    stages = STAGED["xi_stages"] - 1
    if steps_per_epoch < stages:
        raise ValueError(f"{stages} stages need epochs of {stages} steps, not {steps_per_epoch}")
    dense_steps, stage_steps = constant.epochs * steps_per_epoch, steps_per_epoch // stages
    config = dataclasses.replace(
        constant,
        **STAGED,
        xi=constant.xi_total / dense_steps,  # the constant trial's ξ per gate step
        xi_total=None,
        # 6 significant digits, as the table keeps numbers (0.45 / 25 is 0.018000000000000002)
        xi_max=float(f"{STAGED_LAST_TOTAL / stage_steps:.6g}"),
        xi_every_steps=stage_steps,
        dense_steps=dense_steps,
        epochs=constant.epochs + 1,
    )
    config.check_steps(steps_per_epoch)
    return GridRun(config, run.labels)


def design_header(
    space: SearchSpace, configurations: int, seeds: Sequence[int], *, design_seed: int
) -> dict[str, Any]:
    """What decides the table's trials: a restart must agree with it. Path settings are named
    by their last part (the data folder, the backbone), never by where they are."""
    fixed = {k: Path(v).name if k in PATH_FIELDS and v else v for k, v in space.fixed.items()}
    return {
        "space": {"distributions": space.distributions, "fixed": fixed},
        "configurations": configurations,
        "seeds": list(seeds),
        "design": "latin hypercube (scipy.stats.qmc, random-cd)",
        "design_seed": design_seed,
        "threshold_quantiles": list(THRESHOLD_QUANTILES),
        "threshold_every": THRESHOLD_EVERY,
    }


class GateThresholds:
    """The points that post-hoc gate thresholds give during a SoRA trial, as `train_trial`'s
    `report`: at every `every`-th evaluation and the last, for each quantile q the gate entries
    with |g| ≤ τ_q (the q-quantile of the non-zero |g|) are zeroed and val_score, test_score
    and retained_params are scored, without training: one evaluation a point.

    They are scored on a second model, built before the trial starts and loaded from each
    evaluation's checkpoint, with the random state kept: the trial trains exactly as it would
    without them.
    """

    def __init__(
        self,
        config: TrialConfig,
        data: DatasetDict,
        *,
        quantiles: Sequence[float] = THRESHOLD_QUANTILES,
        every: int = THRESHOLD_EVERY,
        device: str | torch.device | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.precision = resolve_precision(config.precision, self.device)
        self.quantiles, self.every = tuple(quantiles), every
        tokenizer = load_tokenizer(config)
        train_loader, loaders = make_loaders(config, data, tokenizer)
        self.last_step = config.evaluation_steps(len(train_loader))[-1]
        self.loaders = {split: loaders[split] for split in ("val", "test") if split in loaders}
        self.task = data_task(config, data)
        total_steps = len(train_loader) * config.epochs
        self.model = build_model(config, total_steps, self.task, tokenizer=tokenizer)
        self.model.to(self.device)
        self.points: dict[int, list[dict[str, Any]]] = {}  # by optimizer step
        self.seconds = 0.0  # spent scoring them

    def __call__(self, metrics: dict[str, Any], checkpoint: str) -> None:
        if metrics["evaluation"] % self.every and metrics["step"] != self.last_step:
            return
        began = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # the loaders draw seeds from the global RNG
            load_adapter(self.model, Path(checkpoint) / "adapter.safetensors")  # save_checkpoint's
            self.points[metrics["step"]] = self.score()
        self.seconds += time.perf_counter() - began

    def score(self) -> list[dict[str, Any]]:
        """The threshold points of the model as it is loaded now."""
        points = []
        taus = gate_quantiles(self.model, self.quantiles)  # none when every rank is pruned
        for q, tau in zip(self.quantiles, taus, strict=False):
            with gates_thresholded(self.model, tau):
                scores = {
                    f"{split}_score": evaluate(
                        self.model, loader, self.task, self.device, self.precision
                    )["score"]
                    for split, loader in self.loaders.items()
                }
                points.append(
                    {"quantile": q, "tau": tau, **scores}
                    | {"retained_params": retained_params(self.model)}
                )
        return points


# What the table keeps of each evaluation (`train.REPORT_KEYS`): `interval_s` is its
# `epoch_time_s`, the wall time of training since the evaluation before and of scoring.
EVALUATION_KEYS = {
    "step": "step",
    "epoch": "epoch",
    "interval_s": "epoch_time_s",
    "val_score": "val_score",
    "test_score": "test_score",
    "retained_params": "retained_params",
}


def record_trial(
    run: GridRun,
    data: DatasetDict,
    folder: Path,
    *,
    searched: Sequence[str],
    thresholds: bool = True,
) -> dict[str, Any]:
    """Train one trial of the design from its start in `folder` (removed after: the line keeps
    what is needed) and return its line of the table, with the post-hoc threshold points of a
    SoRA trial unless `thresholds` is false."""
    shutil.rmtree(folder, ignore_errors=True)  # what an interrupted try left
    began = time.perf_counter()
    scorer = (
        GateThresholds(run.config, data) if thresholds and run.config.method == "sora" else None
    )
    result = train_trial(run.config, output_dir=folder, data=data, report=scorer)
    wall_s = time.perf_counter() - began
    shutil.rmtree(folder, ignore_errors=True)
    points = scorer.points if scorer is not None else {}
    evaluations = [
        {key: metrics.get(name) for key, name in EVALUATION_KEYS.items()}
        | ({"thresholds": points[metrics["step"]]} if metrics["step"] in points else {})
        for metrics in result["history"]
    ]
    return _rounded(
        {
            "trial": run.folder_name,
            **run.labels,
            "params": {name: getattr(run.config, name) for name in searched},
            "status": result["status"],
            "wall_s": wall_s,  # the whole trial: set-up, evaluations, thresholds, export
            "threshold_s": scorer.seconds if scorer is not None else 0.0,
            "evaluations": evaluations,
        }
    )


def _rounded(value: Any) -> Any:
    """Floats to 6 significant digits, all the way down: a compact table, nothing lost that a
    100-row score or a wall time can tell."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def read_table(path: str | os.PathLike) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The table's first line (the design) and its trials; `(None, [])` when there is none."""
    path = Path(path)
    if not path.exists():
        return None, []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return (lines[0], lines[1:]) if lines else (None, [])


def append_line(path: str | os.PathLike, entry: dict[str, Any]) -> None:
    """Add one line to the table: the whole file is written beside it and moved in, so a kill
    leaves the old table or the new one, never half a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_bytes() if path.exists() else b""
    with tempfile.NamedTemporaryFile(
        "wb", dir=path.parent, prefix=f".{path.name}-", delete=False
    ) as staging:
        staging.write(old + json.dumps(entry, separators=(",", ":")).encode() + b"\n")
        staging.flush()
        os.fsync(staging.fileno())
    os.replace(staging.name, path)


def record_curves(
    runs: Sequence[GridRun],
    header: dict[str, Any],
    table: str | os.PathLike,
    work_dir: str | os.PathLike,
    *,
    started: dict[str, Any] | None = None,
    limit: int | None = None,
    thresholds: bool = True,
    on_trial: Callable[[int, int, dict[str, Any], bool], None] | None = None,
) -> list[dict[str, Any]]:
    """Record the first `limit` trials of `runs` (all: `None`) in `table`, skipping those it
    holds; each is trained in a folder of `work_dir`.

    Args:
        runs: The design's trials (`design_runs`).
        header: The design (`design_header`), the table's first line with `started`.
        table: The JSON Lines table.
        work_dir: Where trials train.
        started: How the recording was started (command, machine), kept beside the design in a
            new table, not compared on a restart.
        limit: Record only the first `limit` trials of the design (recorded ones included).
        thresholds: Score the post-hoc gate thresholds of SoRA trials (`GateThresholds`).
        on_trial: Called after each trial with its position, the number of trials to record,
            its line and whether it was recorded before.

    Returns:
        The lines of the first `limit` trials.

    Raises:
        ValueError: the table holds another design.
    """
    first, lines = read_table(table)
    if first is None:
        append_line(table, {"design": header, "started": started or {}})
    elif json.loads(json.dumps(first["design"])) != json.loads(json.dumps(header)):
        changed = sorted(k for k in header if first["design"].get(k) != header[k])
        raise ValueError(
            f"{table} holds another design ({', '.join(changed) or 'its keys'} differ): give "
            "another output, or the settings it was started with"
        )
    recorded = {line["trial"]: line for line in lines}
    searched = sorted(header["space"]["distributions"])
    prepared = PreparedData()
    chosen = list(runs)[:limit]
    rows = []
    for index, run in enumerate(chosen):
        line = recorded.get(run.folder_name)
        before = line is not None
        if line is None:
            folder = Path(work_dir) / run.folder_name
            line = record_trial(
                run, prepared.of(run.config), folder, searched=searched, thresholds=thresholds
            )
            append_line(table, line)
        rows.append(line)
        if on_trial is not None:
            on_trial(index + 1, len(chosen), line, before)
    return rows


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's ρ; `None` for fewer than 3 pairs or a constant side (undefined)."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)


def rank_correlations(lines: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How well each evaluation ranks the finished trials as their last one does: Spearman's ρ
    between each objective (`front.OBJECTIVES`) at every evaluation step and at the end, across
    trials; `reliable_from_step`, the first step from which ρ of val_score stays at least
    `LOW_CORRELATION` (`None`: only the end does); and ρ between two seeds' final val_score of
    the same configurations, the most any early ranking could agree with a rerun.
    """
    finished = [line for line in lines if line["status"] == "finished"]
    steps = [e["step"] for e in finished[0]["evaluations"]] if finished else []
    rows = []
    for index, step in enumerate(steps):
        row = {"step": step, "epoch": finished[0]["evaluations"][index]["epoch"]}
        for key in OBJECTIVES:
            early = [line["evaluations"][index][key] for line in finished]
            final = [line["evaluations"][-1][key] for line in finished]
            row[key] = _spearman(early, final)
        rows.append(row)
    reliable = None
    for row in reversed(rows[:-1]):
        if row["val_score"] is None or row["val_score"] < LOW_CORRELATION:
            break
        reliable = row["step"]
    by_config: dict[int, dict[int, float]] = {}
    for line in finished:
        by_config.setdefault(line["config"], {})[line["seed"]] = line["evaluations"][-1][
            "val_score"
        ]
    seeds = sorted({line["seed"] for line in finished})[:2]
    pairs = [scores for scores in by_config.values() if all(s in scores for s in seeds)]
    seed_rho = (
        _spearman([p[seeds[0]] for p in pairs], [p[seeds[1]] for p in pairs])
        if len(seeds) == 2
        else None
    )
    return {
        "trials": len(finished),
        "diverged": sum(line["status"] != "finished" for line in lines),
        "rows": rows,
        "reliable_from_step": reliable,
        "seed_agreement": {"configurations": len(pairs), "val_score": seed_rho},
        "mean_trial_s": float(np.mean([line["wall_s"] for line in lines])) if lines else None,
        "mean_threshold_s": float(np.mean([line["threshold_s"] for line in lines]))
        if lines
        else None,
        "summary": summary(rows, reliable),
    }


def summary(rows: Sequence[dict[str, Any]], reliable: int | None) -> str:
    """What the rank correlations say about early stopping on this proxy, and no more."""
    if len(rows) < 2 or rows[-2]["val_score"] is None:
        return "Too few finished trials to measure a rank correlation."
    last = rows[-1]["step"]
    if reliable is None:
        before = rows[-2]
        return (
            f"Early stopping cannot help on this proxy: even at step {before['step']} of {last}, "
            f"the val_score ranks the trials with ρ = {before['val_score']:.2f} (below "
            f"{LOW_CORRELATION}) to their final val_score."
        )
    return (
        f"From step {reliable} of {last} ({reliable / last:.0%} of training) on, the val_score "
        f"ranks the trials with ρ ≥ {LOW_CORRELATION} to their final val_score"
        + ("." if reliable == rows[0]["step"] else "; before it, ρ is lower.")
    )
