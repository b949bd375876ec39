import pytest

from sora_tune.data import TASKS, GlueTask, get_task


def test_tasks_cover_glue():
    assert set(TASKS) == {
        "cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "mnli-mm", "qnli", "rte", "wnli"
    }  # fmt: skip
    for name, task in TASKS.items():
        assert task.name == name
        assert task.primary in task.metrics


@pytest.mark.parametrize(
    ("name", "num_labels", "is_regression"),
    [("cola", 2, False), ("mnli", 3, False), ("mnli-mm", 3, False), ("stsb", 1, True)],
)
def test_num_labels_and_regression(name, num_labels, is_regression):
    task = get_task(name)
    assert task.num_labels == num_labels
    assert task.is_regression is is_regression


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("SST-2", "sst2"),
        ("sts-b", "stsb"),
        ("CoLA", "cola"),
        (" MRPC ", "mrpc"),
        ("mnli_mm", "mnli-mm"),
        ("mnli-mismatched", "mnli-mm"),
        ("mnli_matched", "mnli"),
    ],
)
def test_get_task_aliases(alias, name):
    assert get_task(alias) is TASKS[name]


def test_get_task_passes_a_task_through():
    assert get_task(TASKS["rte"]) is TASKS["rte"]


def test_get_task_unknown_names_the_task_and_lists_known_ones():
    with pytest.raises(ValueError, match=r"'squad'.*known tasks: cola, sst2"):
        get_task("squad")


def test_glue_task_checks_primary_metric():
    with pytest.raises(ValueError, match="primary='f1'"):
        GlueTask("x", "X", ("sentence",), ("a", "b"), ("accuracy",), "f1")
