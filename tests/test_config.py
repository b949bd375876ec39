"""TrialConfig: defaults as the authors ran them, ξ that transfers across budgets, refusals."""

import dataclasses
import importlib.util
import inspect

import pytest

from sora_tune.config import (
    DATA_FIELDS,
    DEFAULT_PAPER_ETA,
    DEFAULT_XI,
    FILE_FIELDS,
    OWN_DATA_FIELDS,
    TrialConfig,
)
from sora_tune.data import DataLocation, load_own_data


def test_gate_defaults_follow_the_authors_runs():
    official = TrialConfig(lr=8e-4)
    # run_glue.py sets --sparse_lr to --learning_rate when it is not given.
    assert official.eta is None and official.effective_eta == 8e-4
    assert TrialConfig(lr=1.2e-3).effective_eta == 1.2e-3
    assert TrialConfig(lr=8e-4, eta=0.05).effective_eta == 0.05
    assert official.xi_plan().xi == DEFAULT_XI == 1e-4
    assert official.lam == 0.1
    paper = TrialConfig(gate_mode="paper")
    assert paper.effective_eta == DEFAULT_PAPER_ETA == 0.1
    assert paper.xi_plan().xi == pytest.approx(0.1 * 0.1)  # ξ = η·λ (eq. 10)


@pytest.mark.parametrize(
    "values, steps_per_epoch, expected",
    [
        # constant: the whole trial is one stage of epochs × steps gate steps
        ({"xi_total": 0.6, "epochs": 3}, 100, [0.6 / 300]),
        ({"xi_total": 0.6, "epochs": 3}, 1000, [0.6 / 3000]),
        # a rising schedule: dense 2 epochs, then a stage per epoch; the last runs to the end
        (
            {
                "xi_total": 0.0,
                "xi_schedule": "linear",
                "xi_max": 1.0,
                "xi_stages": 3,
                "dense_epochs": 2,
                "epochs": 5,
            },
            50,
            [0.0, 0.5 / 50, 1.0 / 100],
        ),
        # xi per step stays as given, whatever the steps
        ({"xi": 3e-4, "epochs": 3}, 100, [3e-4]),
    ],
)
def test_xi_total_is_spread_over_the_gate_steps_of_its_stage(values, steps_per_epoch, expected):
    assert list(TrialConfig(**values).stage_xis(steps_per_epoch).values()) == pytest.approx(
        expected
    )


def test_xi_total_means_the_same_pressure_at_any_size():
    small, large = TrialConfig(xi_total=0.5, epochs=2), TrialConfig(xi_total=0.5, epochs=20)
    for config, steps in ((small, 88), (large, 4500)):
        (xi,) = config.stage_xis(steps).values()
        assert xi * steps * config.epochs == pytest.approx(0.5)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"xi": 1e-4, "xi_total": 0.5}, "set xi or xi_total, not both"),
        ({"gate_mode": "paper", "xi_total": 0.5}, "xi is derived"),
        ({"xi_total": -1.0}, "xi_total must be a finite number >= 0"),
        ({"precision": "fp8"}, "precision must be one of auto, bf16, fp16, fp32"),
        ({"base_dtype": "int4"}, "base_dtype must be one of auto, fp32, bf16, fp16, int8, nf4"),
        ({"val_size": 1.5}, "val_size must be a fraction in \\(0, 1\\) or a whole number"),
        ({"val_size": 2.5}, "val_size must be a fraction"),
        ({"val_size": 0.0}, "val_size must be a fraction"),
        (
            {"gate_mode": "paper", "eta": 0.0, "xi_schedule": "linear", "lam": 0.1, "xi_max": 1.0,
             "xi_stages": 2, "epochs": 2},
            "needs eta > 0",
        ),
        (
            {"xi_schedule": "geometric", "xi_max": 1e-2, "xi_stages": 5, "epochs": 3},
            "the xi schedule needs 5 epochs \\(1 dense, then 4 stages of 1\\), but epochs is 3",
        ),
        ({"threshold_quantiles": [0.5, 0.2]}, "threshold_quantiles must be increasing numbers"),
        ({"threshold_quantiles": [0.5, 1.0]}, "threshold_quantiles must be increasing numbers"),
        ({"threshold_quantiles": []}, "threshold_quantiles must be increasing numbers"),
        ({"threshold_quantiles": [0.5], "method": "lora"}, "thresholds SoRA's gates"),
        (
            {"threshold_quantiles": [0.5], "xi_schedule": "linear", "xi_max": 1e-3, "xi_stages": 2,
             "epochs": 2},
            "give a rising xi_schedule \\(linear\\) or threshold_quantiles, not both",
        ),
    ],
)  # fmt: skip
def test_refused_instead_of_silently_changed(values, message):
    with pytest.raises(ValueError, match=message):
        TrialConfig(**values)


def test_val_size_counts_whole_rows():
    assert TrialConfig(val_size=2).val_size == 2
    assert TrialConfig(val_size=100.0).val_size == 100.0


def test_for_schedule_takes_epochs_from_the_schedule_and_refuses_others():
    values = {"xi_schedule": "geometric", "xi": 1e-4, "xi_max": 1e-2, "xi_stages": 4}
    assert TrialConfig.for_schedule(values).epochs == 4
    assert TrialConfig.for_schedule(values | {"dense_epochs": 3}).epochs == 6
    assert TrialConfig.for_schedule(values | {"epochs": 4}).epochs == 4
    with pytest.raises(ValueError, match="the xi schedule runs for 4 epochs, but epochs is 7"):
        TrialConfig.for_schedule(values | {"epochs": 7})


def test_no_dense_phase_starts_at_the_first_raise():
    # dense_epochs 0: stage 0 (ξ0) never trains; the first epoch is already at stage 1.
    config = TrialConfig(
        xi_total=0.1, xi_schedule="linear", xi_max=0.5, xi_stages=3, dense_epochs=0, epochs=3
    )
    assert config.stage_steps(10) == {1: range(0, 10), 2: range(10, 30)}
    assert config.stage_xis(10) == pytest.approx({1: 0.3 / 10, 2: 0.5 / 20})
    assert config.stage_ends(10) == {10: 1, 30: 2}


def test_task_defaults_to_mrpc_unless_own_data_are_given(tmp_path):
    from sora_tune.config import TrialConfig

    (tmp_path / "tickets.csv").write_text("text,label\na,x\nb,y\n")
    assert TrialConfig().task == "mrpc"
    own = TrialConfig(train_file="tickets.csv")
    assert own.task is None and own.own_data
    assert own.train_file == str(tmp_path / "tickets.csv")  # absolute, from the user's folder
    assert own.data_name == "tickets" and own.text_fields == ("text",)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"test_file": "tickets.csv"}, "test_file without train_file"),
        ({"train_file": "tickets.csv", "dataset": "imdb"}, "train_file or dataset, not both"),
        ({"text_columns": ["a"]}, "text_columns describe your own data"),
        ({"metric": "pearson"}, "metric 'pearson' is not reported for mrpc"),
        ({"train_file": "tickets.csv", "metric": "f1"}, "metric must be one of accuracy"),
        ({"train_file": "tickets.csv", "text_columns": ["a", "b", "c"]}, "one column, or two"),
    ],
)
def test_own_data_settings_that_do_not_fit_are_refused(tmp_path, values, message):
    from sora_tune.config import TrialConfig

    (tmp_path / "tickets.csv").write_text("text,label\na,x\nb,y\n")
    with pytest.raises(ValueError, match=message):
        TrialConfig(**values)


def test_the_data_settings_are_listed_in_step():
    """The settings that decide a trial's rows are named in several lists; every one of them is
    in DATA_FIELDS (which keys the shared data and the tokenisation cache), and every setting of
    own data is refused with a GLUE task."""
    location = {field.name for field in dataclasses.fields(DataLocation)}
    reading = set(inspect.signature(load_own_data).parameters) - {"location", "metric"}
    assert location | reading | set(OWN_DATA_FIELDS) | set(FILE_FIELDS) <= set(DATA_FIELDS)
    assert (location - set(FILE_FIELDS) - {"dataset"}) | reading <= set(OWN_DATA_FIELDS)
    assert "pair_separator" in DATA_FIELDS  # it changes the tokens of a pair


@pytest.mark.parametrize("base_dtype", ["int8", "nf4"])
def test_a_quantised_base_without_bitsandbytes_is_refused_naming_the_extra(base_dtype, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name: None if name == "bitsandbytes" else find_spec(name),
    )
    message = f"base_dtype '{base_dtype}' needs bitsandbytes, which is not installed: pip install 'sora-tune\\[quantization\\]'"
    with pytest.raises(ValueError, match=message):
        TrialConfig(base_dtype=base_dtype)
    TrialConfig(base_dtype="bf16")  # a float base needs nothing more
