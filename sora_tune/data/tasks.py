"""The GLUE tasks: text fields, label names and metrics of each, in one table; and the same
description of a user's own data (`own_task`).

Text fields and label ids follow the Hugging Face Hub's ``nyu-mll/glue`` dataset, so data read from
the official TSV files and data from the Hub are interchangeable (e.g. MNLI's ``premise`` and
``hypothesis`` are the TSV's ``sentence1`` and ``sentence2``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CLASSIFICATION_METRICS",
    "REGRESSION_METRICS",
    "TASKS",
    "GlueTask",
    "data_name",
    "get_task",
    "own_task",
]

# What a search scores on the user's own data: every metric of its problem type; the first is
# the default primary (accuracy, or Pearson as GLUE's STS-B). Macro-F1 weighs every class alike.
CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "matthews")
REGRESSION_METRICS = ("pearson", "spearman")


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task, or the user's own data described the same way (see :func:`own_task`).

    Args:
        name: Short task name, e.g. ``"mrpc"``; for own data, the file stem or dataset id.
        folder: The task's folder in the official GLUE layout, e.g. ``"MRPC"``; ``""`` for own
            data.
        text_fields: Names of the text columns: one for single-sentence tasks, two for pairs.
        label_names: Class names in label-id order; ``None`` for regression (STS-B).
        metrics: Metric names that :func:`sora_tune.data.compute_metrics` reports for the task.
        primary: The metric reported as ``score``.
    """

    name: str
    folder: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    primary: str

    def __post_init__(self) -> None:
        if self.primary not in self.metrics:
            raise ValueError(f"primary={self.primary!r} is not one of metrics={self.metrics}")
        if not 1 <= len(self.text_fields) <= 2:
            raise ValueError(f"text_fields={self.text_fields!r} must name one or two columns")

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        """Size of the model's output: the number of classes, or 1 for regression."""
        return 1 if self.label_names is None else len(self.label_names)


_PAIR = ("sentence1", "sentence2")
_NLI = ("entailment", "not_entailment")
_MNLI_LABELS = ("entailment", "neutral", "contradiction")

# Primary metrics follow the LoRA / SoRA papers' GLUE tables: accuracy for MRPC and QQP (not the
# mean of accuracy and F1 of the GLUE leaderboard), Pearson for STS-B, Matthews for CoLA.
TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"),
                 ("matthews",), "matthews"),
        GlueTask("sst2", "SST-2", ("sentence",), ("negative", "positive"),
                 ("accuracy",), "accuracy"),
        GlueTask("mrpc", "MRPC", _PAIR, ("not_equivalent", "equivalent"),
                 ("accuracy", "f1"), "accuracy"),
        GlueTask("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"),
                 ("accuracy", "f1"), "accuracy"),
        GlueTask("stsb", "STS-B", _PAIR, None, ("pearson", "spearman"), "pearson"),
        # MNLI matched and mismatched share the training set and differ in the dev set.
        GlueTask("mnli", "MNLI", ("premise", "hypothesis"), _MNLI_LABELS,
                 ("accuracy",), "accuracy"),
        GlueTask("mnli-mm", "MNLI", ("premise", "hypothesis"), _MNLI_LABELS,
                 ("accuracy",), "accuracy"),
        GlueTask("qnli", "QNLI", ("question", "sentence"), _NLI, ("accuracy",), "accuracy"),
        GlueTask("rte", "RTE", _PAIR, _NLI, ("accuracy",), "accuracy"),
        # WNLI's label order is the reverse of RTE's and QNLI's (1 = entailment), as in GLUE.
        GlueTask("wnli", "WNLI", _PAIR, ("not_entailment", "entailment"),
                 ("accuracy",), "accuracy"),
    )
}  # fmt: skip

# Spellings people use besides the canonical names (GLUE folder names lower-cased, Hub configs).
_ALIASES = {
    "sst-2": "sst2",
    "sts-b": "stsb",
    "mnli-m": "mnli",
    "mnli-matched": "mnli",
    "mnli-mismatched": "mnli-mm",
}


def get_task(name: str | GlueTask) -> GlueTask:
    """Return the task called ``name`` (case-insensitive; ``_`` and ``-`` are interchangeable).

    A :class:`GlueTask` is returned unchanged, so functions can take a task or its name.

    Raises:
        ValueError: If no task has that name.
    """
    if isinstance(name, GlueTask):
        return name
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise ValueError(f"Unknown GLUE task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]


def own_task(
    name: str,
    text_fields: tuple[str, ...],
    label_names: tuple[str, ...] | None,
    metric: str | None = None,
) -> GlueTask:
    """The task of the user's own data: its text columns, its label names (``None`` for
    regression), every metric of its problem type, and ``metric`` as the primary (``None``:
    accuracy, or Pearson for regression).

    Raises:
        ValueError: ``metric`` does not score this problem type (the message lists those that do).
    """
    metrics = REGRESSION_METRICS if label_names is None else CLASSIFICATION_METRICS
    primary = metric or metrics[0]
    if primary not in metrics:
        kind = "regression" if label_names is None else "classification"
        raise ValueError(
            f"metric {primary!r} does not score {kind}: use one of {', '.join(metrics)}"
        )
    return GlueTask(name, "", text_fields, label_names, metrics, primary)


def data_name(
    *, task: str | None = None, train_file: str | None = None, dataset: str | None = None
) -> str:
    """What a trial's data are called, in experiment names and model info: the training file's
    stem, the dataset id (`/` as `-`; a save_to_disk folder's name), or the GLUE task (default
    mrpc)."""
    if train_file is not None:
        return Path(train_file).stem
    if dataset is not None:
        return Path(dataset).name if os.path.isdir(dataset) else dataset.replace("/", "-")
    return get_task(task or "mrpc").name
