"""Grids of trials run one after another on this machine, each in a folder of its own, a
finished one read back instead of trained again: what the reproduction and the benchmarks are
made of. An interrupted grid continues where it stopped; a folder holding a run of other
settings is refused, not overwritten.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DATA_FIELDS, TrialConfig
from .train import check_saved_config, load_tokenizer, prepare_data, train_trial

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
    tokenizer, data, data_key = None, None, None
    for index, run in enumerate(runs):
        folder = Path(runs_dir) / run.folder_name
        result = finished_result(folder, run.config)
        reused = result is not None
        if result is None:
            key = tuple(getattr(run.config, name) for name in DATA_FIELDS)
            if key != data_key:
                tokenizer = tokenizer or load_tokenizer(run.config)
                data, data_key = prepare_data(run.config, tokenizer), key
            result = train_trial(run.config, output_dir=folder, data=data)
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
