"""MLflow's backend and Optuna's study in a real PostgreSQL (the `postgres` fixture: Debian's
server on 127.0.0.1), as teams that share a Ray cluster keep them: a search, then `register` and
`predict`; many trials writing at once; and a database URI whose driver is missing, refused in
one line before anything starts."""

import sys
from concurrent.futures import ThreadPoolExecutor

import mlflow
import optuna
import pandas as pd
import pytest

from sora_tune.registry import predict_file, register
from sora_tune.tune import SearchConfig, run_search
from sora_tune.uris import check_database_driver
from tests.tune.conftest import tiny_search_parameters

WRITERS = 8  # trials writing to the stores at once
EPOCHS = 20  # each writes a trial's evaluations: metrics at every epoch


def test_a_search_on_postgresql_registers_and_predicts(
    postgres, local_ray, tiny_trial, write_space, tmp_path
):
    mlflow_uri = postgres.database("search_mlflow")
    optuna_uri = postgres.database("search_optuna")
    _, space = write_space(tiny_search_parameters(tiny_trial) | {"epochs": 1})
    config = SearchConfig(
        space=space,
        num_samples=2,
        storage_path="ray",
        name="on-postgres",
        experiment_name="on-postgres",
        mlflow_uri=mlflow_uri,
        optuna_storage=optuna_uri,
    )
    run_search(config)

    client = mlflow.MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("on-postgres")
    trials = client.search_runs([experiment.experiment_id], "tags.`sora_tune.role` = 'trial'")
    assert [r.info.status for r in trials] == ["FINISHED", "FINISHED"]
    assert len(optuna.load_study(study_name="on-postgres", storage=optuna_uri).trials) == 2
    registered = register(
        experiment_name="on-postgres", name="on-postgres", tracking_uri=mlflow_uri
    )
    rows = pd.DataFrame({"sentence1": ["A cat sat."], "sentence2": ["A cat was sitting."]})
    rows.to_csv(tmp_path / "rows.csv", index=False)
    predicted = predict_file(registered.model_uri, tmp_path / "rows.csv", tracking_uri=mlflow_uri)
    assert len(predicted) == 1

    # The search is a first-class MLflow run: its numbers are metrics the experiment table sorts.
    (parent,) = client.search_runs(
        [experiment.experiment_id],
        "tags.`sora_tune.role` = 'search'",
        order_by=["metrics.hypervolume DESC"],
    )
    metrics = parent.data.metrics
    assert {k: metrics[k] for k in ("trials_finished", "trials_stopped", "trials_failed")} == {
        "trials_finished": 2,
        "trials_stopped": 0,
        "trials_failed": 0,
    }
    assert 1 <= metrics["front_size"] <= 2 and metrics["compute_s"] > 0
    assert metrics["chosen_val_score"] == registered.val_score <= metrics["best_val_score"]
    assert metrics["chosen_retained_params"] == registered.retained_params
    history = client.get_metric_history(parent.info.run_id, "hypervolume")
    assert [m.step for m in history] == [1, 2] and history[-1].value == metrics["hypervolume"]


def write_like_a_trial(mlflow_uri: str, experiment_id: str, optuna_uri: str, index: int) -> str:
    """What one trial writes to the stores: its MLflow run (params, a metric batch per epoch,
    tags, the end) and its Optuna trial (asked, told)."""
    client = mlflow.MlflowClient(mlflow_uri)
    run = client.create_run(experiment_id, tags={"sora_tune.role": "trial"})
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param("r_max", str(index))])
    for epoch in range(1, EPOCHS + 1):
        metrics = [
            mlflow.entities.Metric(name, epoch / (index + 1), 0, epoch)
            for name in ("val_score", "test_score", "retained_params", "epoch")
        ]
        client.log_batch(run.info.run_id, metrics=metrics)
    client.set_terminated(run.info.run_id, "FINISHED")
    study = optuna.load_study(study_name="writers", storage=optuna_uri)
    trial = study.ask()
    study.tell(trial, [float(index), float(-index)])
    return run.info.run_id


def test_trials_write_to_postgresql_at_once(postgres):
    mlflow_uri = postgres.database("writers_mlflow")
    optuna_uri = postgres.database("writers_optuna")
    experiment_id = mlflow.MlflowClient(mlflow_uri).create_experiment("writers")
    optuna.create_study(
        study_name="writers", storage=optuna_uri, directions=["maximize", "minimize"]
    )
    # Threads, not processes: each writer's statements reach the server on a connection of its
    # own, as from 8 trial processes, without 8 interpreters importing MLflow (~8 s each here).
    with ThreadPoolExecutor(WRITERS) as pool:
        futures = [
            pool.submit(write_like_a_trial, mlflow_uri, experiment_id, optuna_uri, i)
            for i in range(WRITERS)
        ]
        run_ids = [future.result(timeout=300) for future in futures]

    client = mlflow.MlflowClient(mlflow_uri)
    for run_id in run_ids:
        assert client.get_run(run_id).info.status == "FINISHED"
        history = client.get_metric_history(run_id, "val_score")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
    study = optuna.load_study(study_name="writers", storage=optuna_uri)
    assert sorted(t.values[0] for t in study.trials) == list(range(WRITERS))


@pytest.mark.parametrize(
    "setting, uri, message",
    [
        (
            "--optuna-storage",
            "postgresql://alice@db.example.com/optuna",
            r"--optuna-storage postgresql://alice@db.example.com/optuna: its database driver "
            r"\(psycopg\) is not installed: pip install 'sora-tune\[postgres\]'",
        ),
        (
            "--mlflow-uri",
            "postgresql+pg8000://alice@db.example.com/mlflow",
            r"driver \(pg8000\) is not installed: pip install pg8000$",
        ),
        (
            "--mlflow-uri",
            "mysql://alice@db.example.com/mlflow",
            r"driver \(MySQLdb\) is not installed: pip install mysqlclient$",
        ),
    ],
)
def test_a_database_without_its_driver_is_refused_naming_what_to_install(
    setting, uri, message, monkeypatch
):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as where the extra is not installed
    with pytest.raises(ValueError, match=message):
        check_database_driver(setting, uri)
