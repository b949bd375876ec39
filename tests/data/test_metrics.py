import math
import warnings

import numpy as np
import pytest

from sora_tune.data import TASKS, compute_metrics

# A 2x2 confusion by hand: TP=3, FN=1, TN=2, FP=2.
LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0])
PREDS = np.array([1, 1, 1, 0, 0, 0, 1, 1])


def _logits(class_ids: np.ndarray, num_classes: int = 2) -> np.ndarray:
    return np.eye(num_classes)[class_ids] * 2.0 - 1.0


def test_matthews_by_hand():
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (6 - 2) / sqrt(5*4*4*3)
    result = compute_metrics("cola", _logits(PREDS), LABELS)
    assert result["matthews"] == pytest.approx(4 / math.sqrt(240))
    assert result["score"] == result["matthews"]


def test_accuracy_and_f1_by_hand():
    # accuracy = (TP + TN) / N = 5/8; F1 = 2TP / (2TP + FP + FN) = 6/9
    result = compute_metrics("mrpc", _logits(PREDS), LABELS)
    assert result == pytest.approx({"accuracy": 5 / 8, "f1": 6 / 9, "score": 5 / 8})


def test_class_ids_are_accepted_like_logits():
    assert compute_metrics("qqp", PREDS, LABELS) == compute_metrics("qqp", _logits(PREDS), LABELS)


def test_three_class_accuracy():
    labels = np.array([0, 1, 2, 2])
    result = compute_metrics("mnli-mm", _logits(np.array([0, 1, 1, 2]), 3), labels)
    assert result == {"accuracy": 0.75, "score": 0.75}


def test_pearson_and_spearman_by_hand():
    # Deviations from the mean 2.5: x = (-1.5, -.5, .5, 1.5), y = (-1.5, .5, -.5, 1.5);
    # sum(xy) = 4, sum(x^2) = sum(y^2) = 5, so r = 0.8 (and the ranks equal the values).
    result = compute_metrics("stsb", np.array([[1.0], [2.0], [3.0], [4.0]]), np.array([1, 3, 2, 4]))
    assert result == pytest.approx({"pearson": 0.8, "spearman": 0.8, "score": 0.8})


def test_spearman_sees_ranks_only():
    result = compute_metrics("stsb", np.array([1.0, 4.0, 9.0, 16.0]), np.array([1, 2, 3, 4]))
    assert result["spearman"] == pytest.approx(1.0)
    assert result["pearson"] < 0.99


def test_constant_predictions_give_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stsb = compute_metrics("stsb", np.full(4, 2.5), np.array([1.0, 3.0, 2.0, 4.0]))
        cola = compute_metrics("cola", np.ones(8, dtype=int), LABELS)
        mrpc = compute_metrics("mrpc", np.zeros(8, dtype=int), LABELS)
    assert stsb == {"pearson": 0.0, "spearman": 0.0, "score": 0.0}
    assert cola["matthews"] == 0.0
    assert mrpc["f1"] == 0.0


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_reports_its_metrics_and_score(name):
    task = TASKS[name]
    labels = np.array([0.5, 4.0, 2.0]) if task.is_regression else np.array([0, 1, 1])
    predictions = labels if task.is_regression else _logits(labels.astype(int), task.num_labels)
    result = compute_metrics(task, predictions, labels)
    assert set(result) == {*task.metrics, "score"}
    assert result["score"] == result[task.primary]
    assert all(isinstance(value, float) for value in result.values())


@pytest.mark.parametrize(
    ("name", "predictions", "labels", "match"),
    [
        ("rte", np.zeros((3, 2)), np.zeros(4), "3 predictions for 4 labels"),
        ("rte", np.zeros((2, 2, 2)), np.zeros(2), "logits"),
        ("stsb", np.zeros((2, 2)), np.zeros(2), "regression"),
        ("sst2", np.zeros((0, 2)), np.zeros(0), "zero examples"),
    ],
)
def test_bad_shapes_raise(name, predictions, labels, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(name, predictions, labels)
