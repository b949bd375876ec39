"""GLUE (and own-data) metrics from model outputs, computed with scikit-learn and SciPy."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from sora_tune.data.tasks import GlueTask, get_task

__all__ = ["compute_metrics"]


def _correlation(fn: Callable, predictions: np.ndarray, labels: np.ndarray) -> float:
    # A correlation with a constant input is undefined (SciPy returns NaN and warns); an untrained
    # regressor often predicts a constant, and a search needs a number, so report no correlation.
    if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return 0.0
    return float(fn(predictions, labels).statistic)


# Each metric from (predictions, labels, the task's class ids).
_METRICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda p, y, _: float(accuracy_score(y, p)),
    # Binary F1 of the positive class (paraphrase / duplicate), as GLUE reports it.
    "f1": lambda p, y, _: float(f1_score(y, p, zero_division=0.0)),
    # Every class of the task weighs the same, however rare, also one that no scored row has
    # and none was predicted as (its F1 is 0): a model that never predicts a class scores low.
    "macro_f1": lambda p, y, classes: float(
        f1_score(y, p, labels=classes, average="macro", zero_division=0.0)
    ),
    "matthews": lambda p, y, _: float(matthews_corrcoef(y, p)),
    "pearson": lambda p, y, _: _correlation(pearsonr, p, y),
    "spearman": lambda p, y, _: _correlation(spearmanr, p, y),
}


def compute_metrics(
    task: GlueTask | str, predictions: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """Score model outputs on a GLUE task.

    Args:
        task: The task or its name.
        predictions: Model outputs. Classification: logits of shape ``(N, C)`` (arg-maxed), or
            class ids of shape ``(N,)``. Regression: scores of shape ``(N,)`` or ``(N, 1)``.
        labels: Gold class ids or scores, shape ``(N,)``.

    Returns:
        Every metric of ``task.metrics`` plus ``"score"``, the primary metric. Degenerate inputs
        give defined numbers: a correlation with constant predictions or labels is 0.0, F1 with
        no predicted and no true positive is 0.0, and so is Matthews with a constant prediction.

    Raises:
        ValueError: If the shapes do not fit the task or each other, or there are no examples.
    """
    task = get_task(task)
    predictions = np.asarray(predictions)
    labels = np.asarray(labels).reshape(-1)
    if task.is_regression:
        if predictions.ndim == 2 and predictions.shape[1] == 1:
            predictions = predictions[:, 0]
        if predictions.ndim != 1:
            raise ValueError(
                f"{task.name} is a regression task: predictions must have shape (N,) or (N, 1), "
                f"got {predictions.shape}"
            )
    elif predictions.ndim == 2:
        predictions = predictions.argmax(axis=-1)
    elif predictions.ndim != 1:
        raise ValueError(
            f"{task.name} predictions must be logits (N, C) or class ids (N,), "
            f"got shape {predictions.shape}"
        )
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("Cannot compute metrics on zero examples")

    classes = np.arange(task.num_labels)
    results = {name: _METRICS[name](predictions, labels, classes) for name in task.metrics}
    results["score"] = results[task.primary]
    return results
