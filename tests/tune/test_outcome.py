"""Trials a scheduler stops early are stopped, not failed: MLflow FINISHED with the epoch they
stopped at, PRUNED for Optuna, off the front with their reason, `stopped` in the table."""

import mlflow
import optuna
import yaml

from sora_tune.cli import main
from sora_tune.pareto import load_trial_runs
from sora_tune.train import epochs_trained
from sora_tune.tune.outcome import StoppedAsPrunedOptunaSearch, outcome, stopped_early


def test_stopped_early_reads_the_last_result():
    assert stopped_early({"epoch": 1, "budget_epochs": 3})
    assert not stopped_early({"epoch": 3, "budget_epochs": 3})
    assert not stopped_early({"val_score": float("nan"), "status": "diverged"})
    assert not stopped_early(None)
    assert outcome({"epoch": 1, "budget_epochs": 3}, error=False) == "stopped"
    assert outcome({"status": "diverged"}, error=False) == "diverged"
    assert outcome({"epoch": 3, "budget_epochs": 3}, error=True) == "error"


def test_a_report_just_before_the_last_epochs_end_is_not_its_end():
    """At 49k steps an epoch, 2 steps before the end is 1.99996 epochs: not the budget of 2, so
    a trial stopped there is stopped, not finished."""
    per_epoch = 49_000
    before_end = epochs_trained(2 * per_epoch - 2, per_epoch)
    assert before_end < 2 and stopped_early({"epoch": before_end, "budget_epochs": 2})
    at_end = epochs_trained(2 * per_epoch, per_epoch)
    assert at_end == 2 and isinstance(at_end, int)
    assert epochs_trained(per_epoch // 2, per_epoch) == 0.5


def test_optuna_is_told_pruned_not_complete():
    from ray import tune

    storage = optuna.storages.InMemoryStorage()
    searcher = StoppedAsPrunedOptunaSearch(
        {"val_score": "maximize", "retained_params": "minimize"},
        space={"lr": tune.loguniform(1e-4, 1e-2)},
        study_name="told",
        storage=storage,
    )
    for trial_id, epoch in (("a", 3), ("b", 1)):
        searcher.suggest(trial_id)
        result = {"val_score": 0.8, "retained_params": 100.0, "epoch": epoch, "budget_epochs": 3}
        searcher.on_trial_complete(trial_id, result)
    trials = optuna.load_study(study_name="told", storage=storage).trials
    assert [t.state for t in trials] == [
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.PRUNED,
    ]
    assert trials[1].values is None  # no partial-budget values on Optuna's front


def test_a_trial_asha_stops_is_recorded_as_stopped(local_ray, tiny_trial, tmp_path, capsys):
    # STS-B's correlation tells a learning trial from one that barely moves; trials run one at a
    # time, so ASHA (grace 1 epoch, reduction 4) compares the second with the first at epoch 1.
    parameters = tiny_trial | {
        "task": "stsb",
        "epochs": 3,
        "lr": {"type": "choice", "values": [5e-2, 1e-7]},
    }
    points = [{"lr": 5e-2}, {"lr": 1e-7}]
    (tmp_path / "space.yaml").write_text(
        yaml.safe_dump({"parameters": parameters, "points_to_evaluate": points})
    )
    code = main(
        [
            "search",
            "--config",
            "space.yaml",
            "--num-samples",
            "2",
            "--max-concurrent",
            "1",
            "--objective",
            "val_score",
            "--asha",
            "--experiment-name",
            "asha",
            "--name",
            "asha",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("asha").experiment_id],
        "tags.`sora_tune.role` = 'trial'",
    )
    stopped = [r for r in runs if "sora_tune.stopped_at_epoch" in r.data.tags]
    assert len(stopped) == 1, "ASHA stopped the barely learning trial"
    (run,) = stopped
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "1e-07"
    assert run.data.tags["sora_tune.stopped_at_epoch"] == "1"
    assert "failure_reason" not in run.data.tags

    study = optuna.load_study(study_name="asha", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "PRUNED"]

    # ASHA also stops the trial that reaches max_t: it must finish and log its adapter first.
    (finished,) = [r for r in runs if r not in stopped]
    assert finished.info.status == "FINISHED" and finished.data.metrics["epoch"] == 3
    client = mlflow.MlflowClient(uri)
    assert "rank_pattern.json" in {a.path for a in client.list_artifacts(finished.info.run_id)}

    trial_runs = load_trial_runs(experiment_name="asha", tracking_uri=uri)
    assert [r.reason for r in trial_runs.left_out] == ["stopped early at epoch 1"]
    assert list(trial_runs.table["run_id"]) == [r.info.run_id for r in runs if r not in stopped]

    summary = out[out.index("stopped, failed or left out:") :]
    assert "stopped early at epoch 1" in summary.splitlines()[1]
