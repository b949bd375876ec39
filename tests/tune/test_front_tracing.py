"""Front-tracing trials: a trial with a rising ξ schedule leaves a point of the front (and its
pruned adapter) at the end of every stage; `pareto` lists them, Optuna is told one of them, and
`register` + `predict` serve a stage point's own adapter."""

import json

import mlflow
import numpy as np
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
from sora_tune.tune.outcome import traced_point
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


DIRECTIONS = {"val_score": "maximize", "retained_params": "minimize"}


def stage(k: int, score: float, params: float, rank: int = 4) -> dict:
    return {"stage": k, "val_score": score, "retained_params": params, "nonzero_rank": rank}


def told_of(points: list[dict], told=None) -> tuple[float, float]:
    result = {"val_score": 0.0, "retained_params": 1.0, "stage_points": points}
    chosen = traced_point(result, DIRECTIONS, None if told is None else np.array(told))
    return chosen["val_score"], chosen["retained_params"]


def test_optuna_is_told_the_stage_point_that_improves_the_searchs_front_the_most():
    points = [stage(0, 0.80, 1000.0), stage(1, 0.79, 400.0), stage(2, 0.50, 350.0)]
    # Alone, the point that adds the most hypervolume is the small one that nearly keeps the score.
    assert told_of(points) == (0.79, 400.0)
    # Against a search whose front already holds small adapters scoring 0.79, only the dense
    # point still moves the front.
    assert told_of(points, told=[[0.79, 300.0], [0.6, 100.0]]) == (0.80, 1000.0)
    plain = {"val_score": 0.7, "retained_params": 10.0}
    assert traced_point(plain, DIRECTIONS) == plain  # a trial with no stage points: its values


def test_a_zero_rank_stage_is_never_told():
    """retained_params 0 dominates every size; but a rank-0 stage has no adapter to register."""
    points = [stage(0, 0.80, 1000.0), stage(1, 0.79, 400.0), stage(2, 0.78, 0.0, rank=0)]
    assert told_of(points) == (0.79, 400.0)
    assert told_of(points, told=[[0.9, 50.0]]) == (0.79, 400.0)  # all dominated: the later one


def test_a_front_tracing_search_lists_serves_and_registers_stage_points(
    local_ray, tiny_trial, write_space, tmp_path
):
    _, space = write_space(tiny_trial | TRACE | {"lr": {"type": "choice", "values": [2e-2]}})
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
