"""Front-tracing trials: a trial with a rising ξ schedule leaves a point of the front (and its
pruned adapter) at the end of every stage, and one with `threshold_quantiles` after training at
each threshold; `pareto` lists them, Optuna is told one of them, and `register` + `predict`
serve a stage point's own adapter."""

import json

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from sora_tune.config import TrialConfig
from sora_tune.models import load_tokenizer
from sora_tune.pareto import load_trial_runs, pareto_report
from sora_tune.registry import predict_file, register
from sora_tune.tune import run_search
from sora_tune.tune.outcome import StoppedAsPrunedOptunaSearch, candidate_points, told_values
from tests.test_registry import MRPC_LABELS, dev_rows
from tests.tune.conftest import search_in

TRACE = {
    "xi_schedule": "linear",
    "xi_total": 0.0,
    "xi_max": 0.9,
    "xi_stages": 4,
    "dense_epochs": 1,
    "epochs": 4,
}


# Front-tracing by post-hoc thresholds: the constant trial, then 3 thresholded points.
THRESHOLDS = {"threshold_quantiles": [0.25, 0.5, 0.75], "epochs": 2}

DIRECTIONS = {"val_score": "maximize", "retained_params": "minimize"}


def stage(k: int, score: float, params: float, rank: int = 4) -> dict:
    return {"stage": k, "val_score": score, "retained_params": params, "nonzero_rank": rank}


def told_of(points: list[dict], told=None, directions=DIRECTIONS) -> tuple[float, ...] | None:
    result = {"val_score": 0.0, "retained_params": 1.0, "stage_points": points}
    candidates = None if told is None else np.array(told, dtype=float)
    chosen = told_values(candidate_points(result, directions), directions, candidates)
    return None if chosen is None else tuple(chosen.values())


def test_optuna_is_told_the_stage_point_that_improves_the_searchs_front_the_most():
    points = [stage(0, 0.80, 1000.0), stage(1, 0.79, 400.0), stage(2, 0.50, 350.0)]
    # Alone, the point that adds the most hypervolume is the small one that nearly keeps the score.
    assert told_of(points) == (0.79, 400.0)
    # Against a search whose front already holds small adapters scoring 0.79, only the dense
    # point still moves the front.
    assert told_of(points, told=[[0.79, 300.0], [0.6, 100.0]]) == (0.80, 1000.0)
    plain = {"val_score": 0.7, "retained_params": 10.0, "nonzero_rank": 3}
    assert told_values(candidate_points(plain, DIRECTIONS), DIRECTIONS) == {
        "val_score": 0.7,
        "retained_params": 10.0,
    }


def test_a_zero_rank_stage_is_never_told():
    """retained_params 0 dominates every size; but a rank-0 stage has no adapter to register."""
    points = [stage(0, 0.80, 1000.0), stage(1, 0.79, 400.0), stage(2, 0.78, 0.0, rank=0)]
    assert told_of(points) == (0.79, 400.0)
    assert told_of(points, told=[[0.9, 50.0]]) == (0.79, 400.0)  # all dominated: the later one
    # Every stage pruned to rank 0: no point to tell (Optuna records the trial PRUNED).
    assert told_of([stage(0, 0.7, 0.0, rank=0), stage(1, 0.6, 0.0, rank=0)]) is None


def test_with_val_score_alone_the_best_stage_is_told():
    """`--objective val_score` on a front-tracing space: no hypervolume of one objective, the
    trial's best stage score, whatever the others' sizes."""
    points = [stage(0, 0.80, 1000.0), stage(1, 0.82, 400.0), stage(2, 0.50, 350.0)]
    assert told_of(points, directions={"val_score": "maximize"}) == (0.82,)
    assert told_of(points, told=[[0.9]], directions={"val_score": "maximize"}) == (0.82,)


def stage_report(k: int, score: float, params: float, *, epoch: int, rank: int = 4) -> dict:
    """A front-tracing trial's report at the end of stage `k` (budget 4 epochs)."""
    return stage(k, score, params, rank) | {"stage_end": True, "epoch": epoch, "budget_epochs": 4}


def test_the_search_measures_a_trace_trial_against_pareto_s_candidates(tmp_path):
    """The front and reference a trace trial is told against are `pareto`'s: every stage point of
    the trials before it, the completed stages of a stopped one too, not only the points Optuna
    was told. The study names its objectives (optuna-dashboard shows them)."""
    from ray import tune

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = StoppedAsPrunedOptunaSearch(
        DIRECTIONS,
        space={"lr": tune.loguniform(1e-4, 1e-2)},
        study_name="traced",
        storage=optuna.storages.RDBStorage(storage),
    )

    def finish(trial_id: str, points: list[tuple[float, float]], rank: int = 4) -> None:
        """A trace trial of 2 stages (epochs 2 and 4) that went on to its end."""
        reports = [
            stage_report(k, score, params, epoch=2 * (k + 1), rank=rank)
            for k, (score, params) in enumerate(points)
        ]
        searcher.suggest(trial_id)
        searcher.on_trial_result(trial_id, reports[0])
        stages = [stage(k, score, params, rank) for k, (score, params) in enumerate(points)]
        searcher.on_trial_complete(trial_id, reports[1] | {"stage_points": stages})

    finish("a", [(0.80, 1000.0), (0.79, 400.0)])
    # b is stopped after its second stage (epoch 2 of 4): Ray hands that report to
    # on_trial_complete only. Its stages are candidates: (0.84, 300) dominates c's (0.83, 350).
    searcher.suggest("b")
    searcher.on_trial_result("b", stage_report(0, 0.85, 2000.0, epoch=1))
    searcher.on_trial_complete("b", stage_report(1, 0.84, 300.0, epoch=2))
    finish("c", [(0.83, 350.0), (0.86, 2500.0)])
    # d pruned every rank at every stage: nothing to register, so nothing on Optuna's front.
    finish("d", [(0.70, 0.0), (0.60, 0.0)], rank=0)

    study = optuna.load_study(study_name="traced", storage=storage)
    assert study.metric_names == list(DIRECTIONS)
    trials = study.trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "COMPLETE", "PRUNED"]
    assert trials[0].values == [0.79, 400.0]
    # Against the told values alone, (0.83, 350) would add the most; against pareto's
    # candidates it adds nothing, and only c's large point extends the front.
    assert trials[2].values == [0.86, 2500.0]
    assert len(searcher.candidates) == 6


@pytest.mark.parametrize("tracing", [TRACE, THRESHOLDS], ids=["stages", "thresholds"])
def test_a_front_tracing_search_lists_serves_and_registers_stage_points(
    local_ray, tiny_trial, write_space, tmp_path, tracing
):
    """Either way of tracing the front (stages trained on, or thresholds after training) leaves
    its points, each with its adapter, where `pareto`, `register` and `predict` find them."""
    _, space = write_space(tiny_trial | tracing | {"lr": {"type": "choice", "values": [2e-2]}})
    config, uri = search_in(tmp_path, space, "trace", num_samples=1)
    results = run_search(config).results
    assert not results.errors
    assert [p["stage"] for p in results[0].metrics["stage_points"]] == [0, 1, 2, 3]

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("trace").experiment_id], "tags.`sora_tune.role` = 'trial'"
    )
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "stage_val_score")]
    assert steps == [0, 1, 2, 3]
    params = {
        m.step: m.value for m in client.get_metric_history(run.info.run_id, "stage_retained_params")
    }
    assert params[0] > params[1] > params[2] > params[3] > 0, "each stage prunes more"
    stored = {a.path for a in client.list_artifacts(run.info.run_id, "adapters")}
    assert stored == {f"adapters/stage-{k}" for k in range(4)}

    runs = load_trial_runs(experiment_name="trace", tracking_uri=uri)
    assert sorted(runs.table["stage"]) == [0, 1, 2, 3]  # one row per stage, by retained params
    # A budget that only the later stages meet: one of them is chosen, by its own values.
    report = pareto_report(runs, output_dir=tmp_path / "pareto", max_params=params[2])
    stage = report.selected_stage
    assert stage in (2, 3) and report.selected_run_id == run.info.run_id
    csv = pd.read_csv(report.csv_path)
    assert "stage" in csv.columns and len(csv) == len(runs.table)

    registered = register(
        experiment_name="trace",
        name="traced",
        tracking_uri=uri,
        max_params=params[2],
        output_dir=tmp_path / "pareto",
    )
    assert registered.stage == stage and registered.retained_params == params[stage]
    version = client.get_model_version("traced", registered.version)
    assert version.tags["stage"] == str(stage)

    # The served model is the stage's pruned adapter: its logits, and the stage's test score.
    rows = dev_rows(tiny_trial)
    rows[["sentence1", "sentence2"]].to_csv(tmp_path / "rows.csv", index=False)
    predicted = predict_file("models:/traced@champion", tmp_path / "rows.csv", tracking_uri=uri)
    adapter = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path=f"adapters/stage-{stage}", tracking_uri=uri,
        dst_path=str(tmp_path / "stage"),
    )  # fmt: skip
    base = AutoModelForSequenceClassification.from_pretrained(tiny_trial["model"], num_labels=2)
    model = PeftModel.from_pretrained(base, adapter).eval()
    tokenizer = load_tokenizer(TrialConfig.from_dict(tiny_trial))
    encoded = tokenizer(
        rows["sentence1"].tolist(), rows["sentence2"].tolist(), truncation=True, max_length=32,
        padding=True, return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        probabilities = model(**encoded).logits.double().softmax(dim=-1).numpy()
    assert predicted[["prob_not_equivalent", "prob_equivalent"]].to_numpy() == pytest.approx(
        probabilities, abs=1e-5
    )
    accuracy = (predicted["label"] == [MRPC_LABELS[i] for i in rows["label"]]).mean()
    stage_test = {
        m.step: m.value for m in client.get_metric_history(run.info.run_id, "stage_test_score")
    }
    assert accuracy == pytest.approx(stage_test[stage])
    assert json.loads(version.tags["rank_pattern"]) == registered.rank_pattern
    assert np.isfinite(registered.val_score)
