"""Grids of trials run one after another on this machine, each in a folder of its own, a
finished one read back instead of trained again: what the reproduction and the benchmarks are
made of. An interrupted grid continues where it stopped; a folder holding a run of other
settings is refused, not overwritten.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import DatasetDict

from .config import DATA_FIELDS, TrialConfig
from .models import load_tokenizer
from .train import (
    build_trial,
    check_saved_config,
    make_eval_loaders,
    prepare_data,
    resolve_device,
    resolve_precision,
    score_epoch,
    seed_everything,
    train_steps,
    train_trial,
)

# What a grid keeps of every run's final metrics.
RESULT_KEYS = (
    "status",
    "test_score",
    "val_score",
    "train_score",
    "retained_params",
    "nonzero_rank",
    "head_params",
    "train_time_s",
    "epoch",
)


@dataclass(frozen=True)
class GridRun:
    """One trial of a grid.

    Attributes:
        config: Its settings.
        labels: What it stands for in the tables (task, method, r_max, seed, section, ...); the
            folder name is made from them, so equal labels must mean equal settings.
    """

    config: TrialConfig
    labels: dict[str, Any] = field(default_factory=dict)

    @property
    def folder_name(self) -> str:
        return "-".join(f"{k}={v}" for k, v in self.labels.items() if k != "section")


class PreparedData:
    """The tokenised data of the trial last asked for, prepared again only when the settings that
    decide them (`DATA_FIELDS`) change: a grid ordered by those settings tokenises each
    combination once, and holds one in memory."""

    def __init__(self) -> None:
        self._tokenizer = None
        self._key: tuple[Any, ...] | None = None
        self._data: DatasetDict | None = None

    def of(self, config: TrialConfig) -> DatasetDict:
        """The tokenised splits of the trial `config` (`prepare_data`)."""
        key = tuple(getattr(config, name) for name in DATA_FIELDS)
        if key != self._key:
            self._tokenizer = self._tokenizer or load_tokenizer(config)
            self._data, self._key = prepare_data(config, self._tokenizer), key
        return self._data


def finished_result(folder: Path, config: TrialConfig) -> dict[str, Any] | None:
    """The `metrics.json` of a run that ended in `folder`, or `None` if none has.

    Raises:
        ValueError: the folder holds a run with other settings.
    """
    path = folder / "metrics.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    check_saved_config(result.get("config", {}), config, where=str(folder))
    return result


def run_grid(
    runs: Iterable[GridRun],
    runs_dir: str | Path,
    *,
    on_run: Callable[[int, int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train, or read back, every run in order; the data are tokenised once for each distinct
    combination of the settings that decide them (`DATA_FIELDS`).

    Args:
        runs: The grid; labels must be unique.
        runs_dir: One folder per run goes here (`GridRun.folder_name`).
        on_run: Called after each run with its position, the grid's size and its row.

    Returns:
        One row per run: its labels, `RESULT_KEYS` from its final metrics, `folder` and `reused`
        (read back from an earlier invocation).

    Raises:
        ValueError: two runs with the same labels, or a folder holding other settings.
    """
    runs = list(runs)
    names = [run.folder_name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(
            f"runs with the same labels: {sorted({n for n in names if names.count(n) > 1})}"
        )
    rows: list[dict[str, Any]] = []
    prepared = PreparedData()
    for index, run in enumerate(runs):
        folder = Path(runs_dir) / run.folder_name
        result = finished_result(folder, run.config)
        reused = result is not None
        if result is None:
            result = train_trial(run.config, output_dir=folder, data=prepared.of(run.config))
        row = {**run.labels, **{k: result.get(k) for k in RESULT_KEYS}}
        rows.append(row | {"folder": str(folder), "reused": reused})
        if on_run is not None:
            on_run(index + 1, len(runs), rows[-1])
    return rows


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1); `None` where there are too few values."""
    values = [v for v in values if v is not None]
    mean = statistics.mean(values) if values else None
    return mean, statistics.stdev(values) if len(values) > 1 else None


def paired_deltas(
    rows: Sequence[dict[str, Any]], *, pair_by: str, a: dict[str, Any], b: dict[str, Any], key: str
) -> list[float]:
    """`key` of the rows matching `a` minus that of the rows matching `b`, paired by `pair_by`
    (e.g. the seed), over the pairs where both finished."""

    def finished(match: dict[str, Any]) -> dict[Any, float]:
        return {
            row[pair_by]: row[key]
            for row in rows
            if row["status"] == "finished" and all(row.get(k) == v for k, v in match.items())
        }

    first, second = finished(a), finished(b)
    return [first[p] - second[p] for p in sorted(set(first) & set(second))]


@dataclass(frozen=True)
class TrialSpeed:
    """How fast a trial's parts run on a device, measured as `train_trial` runs them."""

    setup_s: float  # the tokenizer, loaders, model with its adapter on the device, optimizers
    step_s: float  # one optimizer step at the trial's batch size, on its own shuffled batches
    eval_row_s: float  # scoring one row (val, test and the training subset are scored alike)
    steps_per_epoch: int  # of the trial's training split at its batch size
    eval_rows: int  # rows scored at every evaluation: train subset, val and test


def measure_speed(
    config: TrialConfig,
    data: DatasetDict,
    *,
    steps: int = 20,
    warmup: int = 3,
    eval_rows: int = 64,
    device: str | torch.device | None = None,
) -> TrialSpeed:
    """Time `steps` optimizer steps (after `warmup` untimed ones: kernels being picked, caches
    filling) and the scoring of up to `eval_rows` rows of each evaluation split, with the model,
    optimizers, batches and precision of the trial `config` on `device`: what a budget is sized
    from. (Every step reads its loss, so the device has finished a step when its time is taken.)

    Raises:
        ValueError: the loss stopped being finite while measuring.
    """
    device = resolve_device(device)
    precision = resolve_precision(config.precision, device)
    seed_everything(config.seed)
    began = time.perf_counter()
    tokenizer = load_tokenizer(config)
    trial = build_trial(config, data, tokenizer, device=device, precision=precision)
    _synchronize(device)
    setup_s = time.perf_counter() - began

    for start, end in ((0, warmup), (warmup, warmup + steps)):  # the warm-up, then the timed
        stats = train_steps(
            trial.model,
            trial.train_loader,
            trial.optimization,
            config=config,
            start=start,
            end=end,
            device=device,
            precision=precision,
        )
        if stats is None:
            raise ValueError(f"the loss of {config.method} stopped being finite while measuring")

    # Scoring is timed on the first rows of each evaluation split, batched as a trial batches them.
    sample = DatasetDict(
        {name: split.select(range(min(eval_rows, len(split)))) for name, split in data.items()}
    )
    sample_loaders = make_eval_loaders(config, sample, tokenizer)
    began = time.perf_counter()
    score_epoch(trial.model, sample_loaders, trial.task, device, precision)
    _synchronize(device)
    eval_s = time.perf_counter() - began
    sampled = sum(len(loader.dataset) for loader in sample_loaders.values())
    return TrialSpeed(
        setup_s=setup_s,
        step_s=stats.seconds / max(steps, 1),
        eval_row_s=eval_s / max(sampled, 1),
        steps_per_epoch=trial.steps_per_epoch,
        eval_rows=sum(len(loader.dataset) for loader in trial.eval_loaders.values()),
    )


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall time measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
