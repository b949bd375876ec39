"""Credentials come from the environment and never reach MLflow: with secrets in the environment
(as a cluster node would have them), `train` and `search` write none of them into a param, a tag,
the tracking store or anything else under the working folder. A URI with a password in it is
refused before anything runs, and the password is not echoed."""

import os
from pathlib import Path

import mlflow
import pytest
import ray

from sora_tune.cli import main
from tests.test_cli import trial_flags

SECRETS = {
    "MLFLOW_TRACKING_PASSWORD": "s3cr3t-mlflow-password",
    "AWS_ACCESS_KEY_ID": "AKIAS3CR3TACCESSKEYID",
    "AWS_SECRET_ACCESS_KEY": "s3cr3t-aws-secret-access-key",
    "HF_TOKEN": "hf_s3cr3tHuggingFaceToken",
    "PGPASSWORD": "s3cr3t-postgres-password",
}


@pytest.fixture
def secret_env(monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    return SECRETS


def leaks(text: str) -> list[str]:
    return [name for name, secret in SECRETS.items() if secret in text]


def assert_no_secret_in_runs(uri: str) -> int:
    """Every param and tag (keys and values) of every run is free of secrets; returns the count."""
    client = mlflow.MlflowClient(uri)
    runs = [
        run
        for experiment in client.search_experiments()
        for run in client.search_runs([experiment.experiment_id])
    ]
    for run in runs:
        for kind, values in (("param", run.data.params), ("tag", run.data.tags)):
            for key, value in values.items():
                assert not leaks(f"{key}={value}"), f"{kind} {key} of run {run.info.run_id}"
    return len(runs)


def assert_no_secret_in_files(root: Path) -> None:
    """Nothing written under `root` (the sqlite store, artifacts, checkpoints, Ray's experiment
    state) holds a secret."""
    for path in root.rglob("*"):
        if path.is_file():
            found = leaks(path.read_bytes().decode("utf-8", errors="replace"))
            assert not found, f"{found} in {path}"


def test_train_logs_no_credentials(secret_env, tiny_trial, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # what the command's default resolves to
    flags = trial_flags(tiny_trial | {"epochs": 1})
    code = main(["train", *flags, "--output-dir", "run", "--mlflow-uri", "sqlite:///mlflow.db"])
    assert code == 0
    assert assert_no_secret_in_runs(uri) == 1
    assert_no_secret_in_files(tmp_path)


def test_search_logs_no_credentials(secret_env, tiny_trial, tmp_path, capsys):
    # The secrets are in the environment before Ray starts, so its workers inherit them, as the
    # workers of a cluster node do.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the default store, in the folder of the command
    space = tmp_path / "space.yaml"
    space.write_text("parameters:\n  xi: {type: loguniform, low: 1.0e-4, high: 1.0e-1}\n")
    flags = trial_flags(tiny_trial | {"epochs": 1})
    try:
        code = main(
            [
                "search",
                "--config",
                str(space),
                *flags,
                "--num-samples",
                "2",
                "--storage-path",
                "ray",
                "--name",
                "secrets",
            ]
        )
    finally:
        ray.shutdown()
    assert code == 0, capsys.readouterr().err
    assert assert_no_secret_in_runs(uri) == 3  # the search and its two trials
    assert not leaks(capsys.readouterr().out)
    assert_no_secret_in_files(tmp_path)


@pytest.mark.parametrize(
    "flag, uri",
    [
        ("--mlflow-uri", "http://alice:{password}@127.0.0.1:5000"),
        ("--storage-path", "s3://AKIAS3CR3TACCESSKEYID:{password}@bucket/searches"),
    ],
)
def test_a_password_in_a_uri_is_refused_and_not_echoed(
    flag, uri, secret_env, tiny_trial, tmp_path, capsys
):
    password = secret_env["MLFLOW_TRACKING_PASSWORD"]
    space = tmp_path / "space.yaml"
    space.write_text("parameters:\n  epochs: 1\n")
    argv = ["search", "--config", str(space), *trial_flags(tiny_trial)]
    argv += [flag, uri.format(password=password)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "carries a password" in captured.err
    assert password not in captured.err + captured.out
    assert not ray.is_initialized()
    assert not os.path.exists(tmp_path / "mlflow.db")
