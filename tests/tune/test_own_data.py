"""Searches on the user's own files, with real Ray and MLflow, from the test's empty folder and
with the default experiment name: a CSV of user-named pair columns with string labels and a
JSON Lines test file; a Parquet regression file without a test file. Then register and predict,
which answer with the file's own label names."""

import json
import random

import mlflow
import pandas as pd
import pytest

from sora_tune.front import NO_TEST_SCORE
from sora_tune.registry import predict_file, register
from sora_tune.tracking import DATA_TAG
from sora_tune.tune import SearchConfig, run_search
from sora_tune.tune.space import SearchSpace

QUESTIONS = {
    "How do I reset my password?": "Use the forgot password link.",
    "Where is my parcel?": "It left our warehouse today.",
    "Can I pay by card?": "Yes, every major card.",
    "How do I cancel my plan?": "Open settings, then billing.",
}


def support_rows(n: int, seed: int = 0) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question = rng.choice(list(QUESTIONS))
        answered = i % 2 == 0
        reply = QUESTIONS[question] if answered else "Please ask someone else."
        rows.append((question, reply, "answered" if answered else "unanswered", float(answered)))
    return pd.DataFrame(rows, columns=["question", "reply", "outcome", "score"])


def tiny_space(tiny_trial: dict, **data) -> SearchSpace:
    """The tiny trial's settings on own data (no GLUE task or folder), one searched knob."""
    fixed = {k: v for k, v in tiny_trial.items() if k not in ("task", "data_dir")}
    return SearchSpace(
        fixed=fixed | {"epochs": 1} | data,
        distributions={"xi": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
    )


def search(space: SearchSpace, tmp_path) -> SearchConfig:
    """A search of `space` as a user starts it from the test's folder, default names; MLflow's
    store is the folder's `mlflow.db` for this process too."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = SearchConfig(space=space.with_resolved_paths(), num_samples=2, storage_path="ray")
    assert config.mlflow_uri == mlflow.get_tracking_uri()
    run_search(config)
    return config


def trial_runs(experiment: str) -> list:
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id])
    return [r for r in runs if r.data.tags.get("sora_tune.role") == "trial"]


def test_csv_pairs_with_string_labels_and_a_jsonl_test_file(
    local_ray, tiny_trial, tmp_path, capsys
):
    support_rows(48).drop(columns="score").to_csv("support.csv", index=False)
    support_rows(12, seed=1).drop(columns="score").to_json(
        "support-test.jsonl", orient="records", lines=True
    )
    space = tiny_space(
        tiny_trial,
        train_file="support.csv",
        test_file="support-test.jsonl",
        text_columns=["question", "reply"],
        label_column="outcome",
    )
    assert search(space, tmp_path).experiment_name == "sora-support"
    # The rows read from each file, and each split's, before any trial starts.
    assert (
        "data: support.csv (train, 48 rows read), support-test.jsonl (test, 12 rows read); "
        "rows per split: train 40, val 8, test 12"
    ) in capsys.readouterr().out

    runs = trial_runs("sora-support")
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    for run in runs:
        assert {"val_score", "test_score", "val_macro_f1", "test_matthews"} <= set(run.data.metrics)
        assert json.loads(run.data.tags[DATA_TAG]) == {
            "name": "support",
            "text_fields": ["question", "reply"],
            "label_names": ["answered", "unanswered"],
            "problem_type": "single_label_classification",
            "metrics": ["accuracy", "macro_f1", "matthews"],
            "metric": "accuracy",
        }
        inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"support.csv", "support-test.jsonl"}
        assert [t.value for t in inputs["support.csv"].tags] == ["train"]
        assert json.loads(inputs["support.csv"].dataset.source)["uri"] == str(
            tmp_path / "support.csv"
        )
        assert len(inputs["support.csv"].dataset.digest) == 16
        profiles = {name: json.loads(i.dataset.profile) for name, i in inputs.items()}
        assert profiles == {"support.csv": {"num_rows": 48}, "support-test.jsonl": {"num_rows": 12}}

    registered = register(experiment_name="sora-support", name="support")
    info = mlflow.pyfunc.load_model(registered.model_uri).metadata.metadata
    assert info["text_fields"] == ["question", "reply"]
    assert info["label_names"] == ["answered", "unanswered"]
    assert (info["problem_type"], info["metric"]) == ("single_label_classification", "accuracy")
    support_rows(4, seed=2).to_parquet("new.parquet")  # other columns are ignored
    predicted = predict_file("models:/support@champion", "new.parquet")
    assert set(predicted["label"]) <= {"answered", "unanswered"}
    assert list(predicted.columns) == [
        "label",
        "probability",
        "prob_answered",
        "prob_unanswered",
    ]


def test_parquet_regression_without_a_test_file(local_ray, tiny_trial, tmp_path):
    support_rows(48).drop(columns="outcome").to_parquet("scores.parquet")
    space = tiny_space(
        tiny_trial,
        train_file="scores.parquet",
        text_columns=["question", "reply"],
        label_column="score",
    )
    assert search(space, tmp_path).experiment_name == "sora-scores"

    runs = trial_runs("sora-scores")
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    for run in runs:
        assert {"val_score", "val_pearson", "val_spearman"} <= set(run.data.metrics)
        assert not any(name.startswith("test_") for name in run.data.metrics)  # none invented
        assert json.loads(run.data.tags[DATA_TAG])["metric"] == "pearson"

    registered = register(experiment_name="sora-scores", name="scores")
    assert registered.test_score != registered.test_score  # NaN: no test set
    version = mlflow.MlflowClient().get_model_version("scores", str(registered.version))
    assert "test_score" not in version.tags
    support_rows(3).to_csv("new.csv", index=False)
    assert list(predict_file("models:/scores@champion", "new.csv").columns) == ["score"]


@pytest.mark.parametrize("value, text", [(float("nan"), NO_TEST_SCORE), (0.5, "0.5000")])
def test_the_commands_say_when_there_is_no_test_score(value, text):
    from sora_tune.front import test_score_text

    assert test_score_text(value) == text
