from pathlib import Path

import pytest
from ray import tune

from sora_tune.tune import SearchConfig
from sora_tune.tune.space import SearchSpace, load_search_space
from tests.tune.conftest import tiny_search_parameters

SPACES = Path(__file__).parents[2] / "search_spaces"


def test_the_glue_space_searches_what_tables_6_and_7_vary():
    space = load_search_space(SPACES / "sora_glue.yaml")
    assert set(space.distributions) == {"xi", "lam", "r_max", "lr"}
    xi, lam = space.distributions["xi"], space.distributions["lam"]
    assert (xi["type"], xi["low"], xi["high"]) == ("loguniform", 1e-5, 1e-3)  # Table 6
    assert (lam["type"], lam["low"], lam["high"]) == ("loguniform", 1e-3, 10.0)  # Table 7's η_t
    assert "eta" not in space.fixed, "the gates learn at the trial's lr, as the authors ran them"
    assert space.points_to_evaluate == [{"xi": 1e-4, "lam": 0.1, "r_max": 8, "lr": 8e-4}]


def test_the_quickstart_space_gives_xi_as_total_shrinkage():
    space = load_search_space(SPACES / "quickstart.yaml")
    assert {"xi_total", "r_max", "lr"} <= set(space.distributions)
    total = space.distributions["xi_total"]
    # From a light touch to most ranks gone, at any budget: ξ × gate steps of the trial.
    assert total["low"] <= 0.2 and total["high"] >= 1.0
    assert space.points_to_evaluate


def test_the_trace_space_trains_as_quickstart_then_takes_the_measured_thresholds():
    """#28 §4: a trace trial's dense phase is the constant trial's whole budget, and its
    thresholds are those the recorded comparison and the replay measured."""
    from sora_tune.curves import THRESHOLD_QUANTILES

    trace, constant = load_search_space("trace"), load_search_space("quickstart")
    assert trace.distributions == constant.distributions
    assert trace.points_to_evaluate == constant.points_to_evaluate
    assert trace.fixed.pop("threshold_quantiles") == list(THRESHOLD_QUANTILES)
    assert trace.fixed == constant.fixed


def test_conversion_to_ray_domains(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "parameters:\n"
        "  xi: {type: loguniform, low: 1.0e-5, high: 1.0e-3}\n"
        "  dropout: {type: uniform, low: 0.0, high: 0.2}\n"
        "  r_max: {type: int, low: 2, high: 8}\n"
        "  seed: {type: int, low: 1, high: 100, log: true}\n"
        "  method: {type: choice, values: [sora, lora]}\n"
        "  base_dtype: {type: choice, values: [bf16, nf4]}\n"
        "  epochs: 2\n"
    )
    param_space = load_search_space(path).to_tune()
    assert param_space["epochs"] == 2
    assert isinstance(param_space["xi"], tune.search.sample.Float)
    assert param_space["r_max"].upper == 9  # inclusive high, Ray's bound is exclusive
    assert param_space["method"].categories == ["sora", "lora"]
    assert param_space["base_dtype"].categories == ["bf16", "nf4"]


def test_cli_overrides_fix_searched_and_fixed_values():
    space = load_search_space(SPACES / "quickstart.yaml").with_fixed({"epochs": 1, "r_max": 4})
    assert space.fixed["epochs"] == 1 and space.fixed["r_max"] == 4
    assert "r_max" not in space.distributions
    assert all("r_max" not in point for point in space.points_to_evaluate)


@pytest.mark.parametrize(
    "text, message",
    [
        ("parameters:\n  xi: [1, 2\n", "malformed YAML at line"),
        (
            "parameters:\n  learning_rate: {type: uniform, low: 0, high: 1}\n",
            "unknown parameter 'learning_rate'",
        ),
        (
            "parameters:\n  r_max: {type: choice, values: []}\n",
            r"parameters.r_max: choice needs a non-empty",
        ),
        (
            "parameters:\n  xi: {type: loguniform, low: 0.0, high: 1.0e-3}\n",
            "parameters.xi: a log scale needs low > 0",
        ),
        (
            "parameters:\n  lam: {type: uniform, low: -0.1, high: 0.1}\n",
            "parameters.lam: lam must be",
        ),
        ("parameters:\n  xi: -1.0e-4\n", "xi must be"),
        ("parameters:\n  r_max: {type: int, low: 0, high: 8}\n", "parameters.r_max: r_max must be"),
        ("parameters:\n  r_max: 0\n", "r_max must be"),
        ("parameters:\n  lr: {type: uniform, low: 0.1, high: 0.01}\n", "parameters.lr: low"),
        ("parameters:\n  lr: {type: gaussian, low: 0.1, high: 0.2}\n", "unknown type 'gaussian'"),
        (
            "parameters:\n  lr: {type: uniform, low: 0.1, high: 0.2, step: 2}\n",
            r"unknown key\(s\) \['step'\]",
        ),
        ("sampler: tpe\n", r"unknown top-level key\(s\) \['sampler'\]"),
        ("parameters:\n  task: imdb\n", "Unknown GLUE task"),
        (
            "parameters:\n  r_max: {type: choice, values: [4, 8]}\npoints_to_evaluate:\n  - {xi: 1.0e-4}\n",
            r"points_to_evaluate\[0\] sets \['xi'\], which are not searched",
        ),
    ],
)
def test_bad_spaces_name_the_problem(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_search_space(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        load_search_space("does-not-exist.yaml")


def test_a_shipped_space_is_found_by_name_from_any_folder(tmp_path):
    # The tests run in tmp_path: no search_spaces/ here.
    assert (
        load_search_space("quickstart").distributions
        == load_search_space(SPACES / "quickstart.yaml").distributions
    )
    with pytest.raises(FileNotFoundError, match=r"shipped spaces \(quickstart, sora_glue, trace\)"):
        load_search_space("no-such-space")


def test_model_based_samplers_run_a_quarter_of_the_trials_at_once(tiny_trial, write_space):
    _, space = write_space(tiny_search_parameters(tiny_trial))
    assert SearchConfig(space=space, num_samples=32).max_concurrent == 8
    assert SearchConfig(space=space, num_samples=4, sampler="nsga2").max_concurrent == 2
    assert SearchConfig(space=space, num_samples=32, sampler="random").max_concurrent is None
    assert SearchConfig(space=space, num_samples=32, max_concurrent=16).max_concurrent == 16


@pytest.mark.parametrize(
    "epochs, largest",
    [(3, 3), ({"type": "int", "low": 1, "high": 4}, 4), ({"type": "choice", "values": [2, 5]}, 5)],
)
def test_the_budget_is_the_largest_epochs_of_the_space(epochs, largest):
    """What the schedulers' rungs go up to, however `epochs` is given."""
    space = SearchSpace(
        distributions={"epochs": epochs} if isinstance(epochs, dict) else {},
        fixed={} if isinstance(epochs, dict) else {"epochs": epochs},
    )
    assert space.largest("epochs") == largest
