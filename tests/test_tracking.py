"""A trial's MLflow record (`tracking.TrialRecord` through `tracked_trial`), in a real sqlite
store."""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from mlflow import MlflowClient

from sora_tune.config import TrialConfig
from sora_tune.data import DataSource, get_task
from sora_tune.tracking import PRECISION_TAG, TrialRecord, create_trial_run, tracked_trial
from sora_tune.train import latest_checkpoint
from tests.conftest import stop_after


def test_the_precision_is_tagged_when_the_trial_starts(tiny_trial, tmp_path):
    """A trial a scheduler stops after an epoch leaves points scored in its precision: the run
    says which from the start, not only once training returns."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = create_trial_run(uri, "precision")
    client = MlflowClient(uri)
    tagged = []

    def report(metrics, checkpoint):  # where Ray may stop the trial
        tagged.append(client.get_run(run_id).data.tags.get(PRECISION_TAG))

    config = TrialConfig.from_dict(tiny_trial | {"epochs": 1, "precision": "bf16"})
    tracked_trial(
        config, run_id=run_id, tracking_uri=uri, output_dir=tmp_path / "run", report=report
    )
    assert tagged == ["bf16"]
    # GLUE's files are the run's dataset inputs, as a user's own files are.
    inputs = {i.dataset.name: i for i in client.get_run(run_id).inputs.dataset_inputs}
    assert {name: [t.value for t in i.tags] for name, i in inputs.items()} == {
        "MRPC/train.tsv": ["train"],
        "MRPC/dev.tsv": ["test"],
    }
    profiles = {name: json.loads(i.dataset.profile) for name, i in inputs.items()}
    assert profiles == {"MRPC/train.tsv": {"num_rows": 48}, "MRPC/dev.tsv": {"num_rows": 16}}
    source = json.loads(inputs["MRPC/dev.tsv"].dataset.source)
    assert source == {"uri": str(tmp_path / "glue" / "MRPC" / "dev.tsv")}


def test_an_epoch_trained_again_is_logged_once(tiny_trial, tmp_path):
    """A trial that logged epoch 2 but whose checkpoint of it did not last (a search stopped
    before Ray kept it) trains epoch 2 again when it resumes: every step keeps one value."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = create_trial_run(uri, "again")
    config = TrialConfig.from_dict(tiny_trial)
    output = tmp_path / "run"
    Stop, report = stop_after(2)
    with pytest.raises(Stop):
        tracked_trial(config, run_id=run_id, tracking_uri=uri, output_dir=output, report=report)
    shutil.rmtree(latest_checkpoint(output))  # epoch 2's checkpoint is lost: start again
    result = tracked_trial(config, run_id=run_id, tracking_uri=uri, output_dir=output)
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in ("epoch", "val_score", "train_time_s", "head_params"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == ([3] if key == "head_params" else [1, 2, 3]), key
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "val_score")}
    assert logged[3] == pytest.approx(result["val_score"])


def test_trials_logging_the_same_files_at_once_all_record_them(tmp_path):
    """Trials of one search log the same dataset inputs at the same moment; MLflow's store can
    fail one of them on the dataset's unique key (seen in CI: a trial FAILED for it)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("at-once")
    sources = [DataSource("train", "rows.csv", str(tmp_path / "rows.csv"), "local", "0123abcd")]
    run_ids = [client.create_run(experiment_id).info.run_id for _ in range(8)]

    def log(run_id: str) -> None:
        record = TrialRecord(MlflowClient(uri), run_id, TrialConfig(), tmp_path)
        record.log_data(get_task("mrpc"), sources)

    with ThreadPoolExecutor(len(run_ids)) as pool:
        list(pool.map(log, run_ids))
    for run_id in run_ids:
        (logged,) = client.get_run(run_id).inputs.dataset_inputs
        assert logged.dataset.digest == "0123abcd"
