"""The LoRA ladder beside a SoRA search: which trials it adds, that Optuna and the scheduler
never see them, and that a real search runs them and compares SoRA's front with them."""

import mlflow
import optuna
import pytest

from sora_tune.cli import search_summary
from sora_tune.pareto import format_table
from sora_tune.registry import choose_trial
from sora_tune.tune import SearchConfig, run_search
from sora_tune.tune.baselines import ladder_ranks, ladder_trials
from sora_tune.tune.space import SearchSpace
from tests.tune.conftest import search_in


def test_the_ladder_doubles_the_rank_up_to_the_largest_r_max():
    assert ladder_ranks(8) == [1, 2, 4, 8]
    assert ladder_ranks(6) == [1, 2, 4, 6]
    assert ladder_ranks(1) == [1]


def test_ladder_trials_take_the_first_point_as_lora():
    space = SearchSpace(
        distributions={
            "r_max": {"type": "choice", "values": [4, 8]},
            "lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        },
        fixed={"xi_schedule": "linear", "xi_total": 0.0, "xi_max": 1.0, "xi_stages": 3, "seed": 5},
        points_to_evaluate=[{"r_max": 8, "lr": 8e-4}],
    )
    trials = ladder_trials(space, seeds=2)
    assert [(t["r_max"], t["seed"]) for t in trials] == [
        (1, 5), (1, 6), (2, 5), (2, 6), (4, 5), (4, 6), (8, 5), (8, 6)
    ]  # fmt: skip
    for trial in trials:
        assert trial["method"] == "lora" and trial["lr"] == 8e-4
        assert trial["xi_schedule"] == "linear" and trial["xi_max"] == 1.0  # as the point's
    # An integer range of r_max: up to its upper bound.
    ranged = SearchSpace(distributions={"r_max": {"type": "int", "low": 2, "high": 4}})
    assert [t["r_max"] for t in ladder_trials(ranged, seeds=1)] == [1, 2, 4]


def test_the_ladder_needs_both_objectives(tiny_trial, write_space, tmp_path):
    _, space = write_space({**tiny_trial, "lr": {"type": "choice", "values": [1e-3, 5e-3]}})
    with pytest.raises(ValueError, match="baseline lora-ladder .* objective multi"):
        SearchConfig(space=space, baseline="lora-ladder", objective="val_score")


def test_a_search_runs_the_ladder_beside_sora(local_ray, tiny_trial, write_space, tmp_path):
    parameters = tiny_trial | {
        "epochs": 2,
        "r_max": {"type": "choice", "values": [2, 4]},
        "xi": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
    }
    _, space = write_space(parameters, points=[{"r_max": 4, "xi": 1e-3}])
    config, uri = search_in(
        tmp_path, space, "ladder", num_samples=2, baseline="lora-ladder", early_stop="pareto"
    )
    search = run_search(config)
    assert not search.results.errors
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs(
        [search.experiment_id], "tags.`sora_tune.role` = 'trial'", max_results=100
    )
    by_method = {}
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags
        by_method.setdefault(run.data.params["method"], []).append(int(run.data.params["r_max"]))
    assert sorted(by_method["lora"]) == [1, 2, 4]
    assert len(by_method["sora"]) == 2
    # Optuna was told the SoRA trials only.
    study = optuna.load_study(study_name="ladder", storage=config.optuna_storage)
    assert len(study.trials) == 2
    assert {t.params["r_max"] for t in study.trials} <= {2, 4}
    # The end of the search compares SoRA's front with the ladder, and draws it.
    summary = search_summary(search)
    assert "against the LoRA ladder (3 runs, ranks 1, 2, 4):" in summary
    assert (
        "hypervolume SoRA / ladder" in summary and "SoRA points above the ladder's line" in summary
    )
    report = choose_trial(
        experiment_name="ladder", parent_run_id=search.parent_run_id, tracking_uri=uri
    )
    assert report.ladder is not None
    assert report.ladder.above + report.ladder.on + report.ladder.below == 2
    assert report.table.loc[report.table["selected"], "method"].tolist() == ["sora"]
    assert "against the LoRA ladder" in format_table(report)
