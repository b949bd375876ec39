"""`load_trial_runs` and `pareto_report` against a real MLflow store (sqlite in a temporary folder).

The store is shared by the module; a test that checks tags first writes them itself.
"""

import math
import time

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from sora_tune.pareto import format_table, load_trial_runs, pareto_report
from sora_tune.pareto.runs import ladder_lines

ROLE = "sora_tune.role"

# name: (method, r_max, val_score, retained_params, test_score, nonzero_rank, train_time_s)
FINISHED = {
    "small": ("sora", 4, 0.80, 2000, 0.78, 10, 30.0),
    "mid": ("sora", 8, 0.86, 6000, 0.83, 30, 60.0),
    "big": ("sora", 16, 0.87, 20000, 0.88, 90, 120.0),
    "dominated": ("sora", 16, 0.84, 15000, 0.86, 70, 5.0),  # fastest: on a front with time
    "lora": ("lora", 8, 0.85, 24576, 0.84, 96, math.nan),  # no time: left out with time
}


def add_trial(client, experiment_id, parent_id, name, method, r_max, metrics, **tags):
    """A trial run as `tracked_trial` records it: params as strings, per-epoch history with
    step=epoch, then the final values (step 0)."""
    tags = {"mlflow.parentRunId": parent_id, ROLE: "trial", "ray_trial_id": name, **tags}
    run_id = client.create_run(experiment_id, tags=tags, run_name=name).info.run_id
    params = {"task": "mrpc", "method": method, "r_max": str(r_max), "xi": "0.0001", "lam": "None"}
    now = int(time.time() * 1000)
    logged = {k: v for k, v in metrics.items() if not (k == "train_time_s" and math.isnan(v))}
    history = [Metric(k, v * e / 3, now, e) for e in (1, 2, 3) for k, v in logged.items()]
    final = [Metric(k, v, now + 1, 0) for k, v in logged.items()]
    client.log_batch(
        run_id, metrics=history + final, params=[Param(k, v) for k, v in params.items()]
    )
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One search with 5 finished trials (4 SoRA, 1 LoRA) and 4 that are left out, plus an
    experiment with a baseline only and no search run."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("search-a", artifact_location=str(root / "artifacts"))
    parent = client.create_run(experiment_id, tags={ROLE: "search"}, run_name="search")
    parent_id = parent.info.run_id
    ids = {}
    for name, (method, r_max, *values) in FINISHED.items():
        metrics = dict(
            zip(
                ("val_score", "retained_params", "test_score", "nonzero_rank", "train_time_s"),
                values,
                strict=True,
            )
        )
        ids[name] = add_trial(client, experiment_id, parent_id, name, method, r_max, metrics)
    scores = {"val_score": 0.9, "retained_params": 100.0}
    ids["failed"] = add_trial(
        client,
        experiment_id,
        parent_id,
        "failed",
        "sora",
        8,
        scores,
        failure_reason="RuntimeError: trial diverged",
    )
    ids["running"] = add_trial(client, experiment_id, parent_id, "running", "sora", 8, scores)
    ids["no-val"] = add_trial(
        client, experiment_id, parent_id, "no-val", "sora", 8, {"retained_params": 50.0}
    )
    ids["nan-val"] = add_trial(
        client, experiment_id, parent_id, "nan-val", "sora", 8, {**scores, "val_score": math.nan}
    )
    for name, run_id in ids.items():
        if name != "running":
            client.set_terminated(run_id, "FAILED" if name == "failed" else "FINISHED")
    client.set_terminated(parent_id)

    other = client.create_experiment("baselines", artifact_location=str(root / "other"))
    baseline = client.create_run(other, run_name="lora-only").info.run_id
    client.log_batch(
        baseline,
        metrics=[Metric("val_score", 0.8, 0, 0), Metric("retained_params", 1e4, 0, 0)],
        params=[Param("method", "lora")],
    )
    client.set_terminated(baseline)
    return {"uri": uri, "client": client, "parent": parent_id, "ids": ids}


def names(store, run_ids):
    by_id = {v: k for k, v in store["ids"].items()}
    return {by_id[run_id] for run_id in run_ids}


@pytest.fixture(scope="module")
def trials(store):
    return load_trial_runs(parent_run_id=store["parent"], tracking_uri=store["uri"])


def test_candidates_and_left_out_reasons(store, trials):
    assert names(store, trials.table["run_id"]) == set(FINISHED)
    assert trials.table["retained_params"].is_monotonic_increasing
    mid = trials.table.set_index("run_id").loc[store["ids"]["mid"]]
    # The final values, not an epoch's, and params parsed back.
    assert (mid["val_score"], mid["r_max"], mid["method"]) == (0.86, 8, "sora")
    reasons = {name: r.reason for r in trials.left_out for name in names(store, [r.run_id])}
    assert reasons == {
        "failed": "failed: RuntimeError: trial diverged",
        "running": "unfinished (RUNNING)",
        "no-val": "missing metric val_score",
        "nan-val": "metric val_score is NaN",
    }
    assert trials.parent_run_id == store["parent"]
    assert trials.experiment_name == "search-a"


def test_by_experiment_name_finds_the_same_runs_and_the_parent(store, trials):
    by_name = load_trial_runs(experiment_name="search-a", tracking_uri=store["uri"])
    pd.testing.assert_frame_equal(by_name.table, trials.table)
    assert by_name.parent_run_id == store["parent"]
    assert len(by_name.left_out) == len(trials.left_out)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"experiment_name": "nope"}, "no MLflow experiment named 'nope'"),
        ({"parent_run_id": "0" * 32}, "no MLflow run with id"),
        ({}, "exactly one of"),
        ({"experiment_name": "search-a", "parent_run_id": "x"}, "exactly one of"),
    ],
)
def test_bad_sources_are_refused(store, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_trial_runs(tracking_uri=store["uri"], **kwargs)


def test_report_writes_front_tags_and_files(store, trials, tmp_path):
    result = pareto_report(trials, output_dir=tmp_path)

    assert names(store, result.front["run_id"]) == {"small", "mid", "big"}
    assert names(store, [result.selected_run_id]) == {"big"}
    assert result.selected["test_score"] == 0.88
    # Reference (0, 1.1 × 20000); by params: 0.80 × 20000 + 0.06 × 16000 + 0.01 × 2000.
    assert result.reference == pytest.approx((0.0, 22000.0))
    assert result.hypervolume == pytest.approx(16980.0)

    client = store["client"]
    tags = {
        name: client.get_run(run_id).data.tags.get("pareto")
        for name, run_id in store["ids"].items()
    }
    assert tags == {
        "small": "true",
        "mid": "true",
        "big": "true",
        "dominated": "false",
        "lora": "false",
        "failed": None,
        "running": None,
        "no-val": None,
        "nan-val": None,
    }
    csv = pd.read_csv(result.csv_path)
    assert len(csv) == len(FINISHED) and csv["retained_params"].is_monotonic_increasing
    assert csv["on_front"].sum() == 3 and csv["selected"].sum() == 1
    assert result.png_path.stat().st_size > 10_000
    logged = {a.path for a in client.list_artifacts(store["parent"])}
    assert {"pareto.csv", "pareto.png"} <= logged
    parent_tags = client.get_run(store["parent"]).data.tags
    assert parent_tags["pareto_selected_run_id"] == result.selected_run_id


@pytest.mark.parametrize(
    "rule, chosen, words",
    [
        ({}, "big", "best val_score"),
        ({"max_params": 10000}, "mid", "retained_params <= 10000"),
        ({"min_score": 0.85}, "mid", "val_score >= 0.85"),
        ({"min_score": 0.8}, "small", "val_score >= 0.8"),
        ({"knee": True}, "mid", "knee of the front"),
    ],
)
def test_selection_rules(store, trials, tmp_path, rule, chosen, words):
    result = pareto_report(trials, output_dir=tmp_path, log_to_parent=False, **rule)
    assert names(store, [result.selected_run_id]) == {chosen}
    assert words in result.rule


def test_impossible_rule_writes_nothing(trials, tmp_path):
    with pytest.raises(ValueError, match="no run reaches val_score 0.9; best is 0.87 with 20000"):
        pareto_report(trials, min_score=0.9, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_train_time_as_a_third_objective(store, trials, tmp_path):
    result = pareto_report(
        trials, objectives=("val_score", "retained_params", "train_time_s"), output_dir=tmp_path
    )
    # The fast run joins the front, the choice (score and params only) does not change.
    assert names(store, result.front["run_id"]) == {"small", "mid", "big", "dominated"}
    assert names(store, [result.selected_run_id]) == {"big"}
    assert store["client"].get_run(store["ids"]["dominated"]).data.tags["pareto"] == "true"
    lora = [r.reason for r in result.left_out if r.run_id == store["ids"]["lora"]]
    assert lora == ["missing metric train_time_s"]
    assert len(result.reference) == 3


def test_bad_objectives_are_refused(trials, tmp_path):
    with pytest.raises(ValueError, match="objectives must be"):
        pareto_report(trials, objectives=("val_score", "test_score"), output_dir=tmp_path)


def test_baselines_alone_make_no_front(store, tmp_path):
    baselines = load_trial_runs(experiment_name="baselines", tracking_uri=store["uri"])
    assert baselines.parent_run_id is None and len(baselines.table) == 1
    with pytest.raises(ValueError, match="no finished sora run"):
        pareto_report(baselines, output_dir=tmp_path)


def test_format_table(store, trials, tmp_path):
    text = format_table(pareto_report(trials, output_dir=tmp_path, log_to_parent=False))
    selected = [line for line in text.splitlines() if line.startswith("*")]
    assert len(selected) == 1 and store["ids"]["big"][:8] in selected[0]
    assert "left out (4):" in text
    assert "failed: RuntimeError: trial diverged" in text
    assert "hypervolume 16980 (reference val_score=0, retained_params=2.2e+04)" in text


def test_an_experiment_of_several_searches_is_read_as_its_newest(store, capsys):
    """Without a parent run id, the newest search's trials are read, never a mix, and the note
    says which and how many searches there are."""
    client = store["client"]
    experiment = client.create_experiment("two-searches")
    older = client.create_run(experiment, tags={ROLE: "search"}, run_name="older").info.run_id
    add_trial(
        client, experiment, older, "old", "sora", 4, {"val_score": 0.9, "retained_params": 1.0}
    )
    time.sleep(0.01)
    newer = client.create_run(experiment, tags={ROLE: "search"}, run_name="newer").info.run_id
    new = add_trial(
        client, experiment, newer, "new", "sora", 4, {"val_score": 0.5, "retained_params": 9.0}
    )
    for run_id in (older, newer, *[r.info.run_id for r in client.search_runs([experiment])]):
        client.set_terminated(run_id)
    runs = load_trial_runs(experiment_name="two-searches", tracking_uri=store["uri"])
    assert list(runs.table["run_id"]) == [new] and runs.parent_run_id == newer
    assert runs.note == (
        f"using the newest search of 'two-searches': newer ({newer}); the experiment holds 2 "
        "searches, pass --parent-run-id (parent_run_id) to choose another"
    )
    single = load_trial_runs(parent_run_id=older, tracking_uri=store["uri"])
    assert single.note is None and len(single.table) == 1


@pytest.mark.parametrize("epoch", ["3", "1.04"])  # stages in epochs, or in steps
def test_a_stopped_front_tracing_trial_keeps_its_completed_stages(store, epoch):
    """Stopped at a rung, a front-tracing trial has finished some stages: those points are as
    complete as the same stages of a trial that went on, so they are candidates. With stages in
    steps it stops inside an epoch."""
    client = store["client"]
    experiment = client.create_experiment(f"traced-stopped-{epoch}")
    search = client.create_run(experiment, tags={ROLE: "search"}, run_name="s").info.run_id
    run_id = add_trial(
        client,
        experiment,
        search,
        "traced",
        "sora",
        8,
        {"val_score": 0.7, "retained_params": 500.0},
        **{"sora_tune.stopped_at_epoch": epoch},
    )
    now = int(time.time() * 1000)
    stages = [
        Metric(f"stage_{key}", value, now, stage)
        for stage, (score, params) in enumerate([(0.8, 900.0), (0.75, 600.0)])
        for key, value in (("val_score", score), ("retained_params", params))
    ]
    client.log_batch(run_id, metrics=stages)
    for run in (run_id, search):
        client.set_terminated(run)
    runs = load_trial_runs(experiment_name=f"traced-stopped-{epoch}", tracking_uri=store["uri"])
    assert runs.table["stage"].tolist() == [1, 0]  # by retained params
    assert runs.table["val_score"].tolist() == [0.75, 0.8]
    assert runs.stopped == {run_id: float(epoch)}
    (left,) = runs.left_out
    assert left.reason == f"stopped early at epoch {epoch}; its completed stages are candidates"


def test_a_point_pruned_to_rank_zero_is_no_candidate(store, tmp_path):
    """A SoRA point that pruned every rank exported no adapter: `register` could not serve it, so
    it is left out, with its reason, never on the front (retained_params 0 would dominate it)."""
    client = store["client"]
    experiment = client.create_experiment("pruned-away")
    search = client.create_run(experiment, tags={ROLE: "search"}, run_name="s").info.run_id
    point = {"val_score": 0.6, "retained_params": 0.0, "nonzero_rank": 0}
    head_only = add_trial(client, experiment, search, "head-only", "sora", 8, point)
    kept = {"val_score": 0.7, "retained_params": 500.0, "nonzero_rank": 5}
    kept_id = add_trial(client, experiment, search, "kept", "sora", 8, kept)
    traced = add_trial(client, experiment, search, "traced", "sora", 8, point)
    now = int(time.time() * 1000)
    stages = [(0.8, 900.0, 4), (0.75, 0.0, 0)]
    client.log_batch(
        traced,
        metrics=[
            Metric(f"stage_{key}", value, now, stage)
            for stage, values in enumerate(stages)
            for key, value in zip(
                ("val_score", "retained_params", "nonzero_rank"), values, strict=True
            )
        ],
    )
    for run in (head_only, kept_id, traced, search):
        client.set_terminated(run)
    runs = load_trial_runs(parent_run_id=search, tracking_uri=store["uri"])
    candidates = zip(runs.table["run_id"], runs.table["stage"].fillna(-1), strict=True)
    assert set(candidates) == {(kept_id, -1), (traced, 0)}
    assert {(r.run_id, r.reason) for r in runs.left_out} == {
        (head_only, "pruned every rank: no adapter to register"),
        (traced, "stage 1: pruned every rank: no adapter to register"),
    }
    report = pareto_report(runs, output_dir=tmp_path, min_score=0.0, log_to_parent=False)
    assert report.selected["retained_params"] == 500.0


def test_ladder_lines_name_sora_points_as_the_table_above_them(store, tmp_path):
    """`pareto`'s table names runs by id, the end of a search by Ray trial name: the ladder's
    lines follow. Their hypervolume ratio says it has a reference point of its own."""
    client = store["client"]
    experiment = client.create_experiment("ladder-names")
    search = client.create_run(experiment, tags={ROLE: "search"}, run_name="s").info.run_id
    points = {
        "run_trial_weak": ("sora", {"val_score": 0.7, "retained_params": 5000.0}),
        "run_trial_strong": ("sora", {"val_score": 0.9, "retained_params": 8000.0}),
        "run_trial_rung": ("lora", {"val_score": 0.8, "retained_params": 3000.0}),
    }
    ids = {
        name: add_trial(client, experiment, search, name, method, 4, metrics)
        for name, (method, metrics) in points.items()
    }
    for run in [*ids.values(), search]:
        client.set_terminated(run)
    runs = load_trial_runs(parent_run_id=search, tracking_uri=store["uri"])
    report = pareto_report(runs, output_dir=tmp_path, log_to_parent=False)
    by_id, by_name = ladder_lines(report), ladder_lines(report, name_by="run_name")
    assert by_id[-1].endswith(f"dominates 1 SoRA point(s): {ids['run_trial_weak'][:8]}")
    assert by_name[-1].endswith("dominates 1 SoRA point(s): run_trial_weak")
    assert "not the one above of SoRA's alone" in by_id[2]
