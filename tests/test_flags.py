"""The command line's flags come from the config dataclasses: every field is reachable, with
its type, choices, default and help, and nothing is typed twice."""

import dataclasses
import typing

import pytest

from sora_tune.cli import build_parser, main
from sora_tune.config import TrialConfig
from sora_tune.flags import field_help
from sora_tune.tune.config import SEARCH_GROUPS, SearchConfig


def actions(command: str) -> dict[str, object]:
    subparsers = next(a for a in build_parser()._actions if a.choices)
    return {a.dest: a for a in subparsers.choices[command]._actions}


@pytest.mark.parametrize("command", ["train", "sparsify", "search", "estimate"])
def test_every_trial_field_has_a_flag_with_its_choices_and_help(command):
    flags = actions(command)
    helps = field_help(TrialConfig)
    hints = typing.get_type_hints(TrialConfig)
    for field in dataclasses.fields(TrialConfig):
        action = flags[field.name]
        assert action.option_strings == ["--" + field.name.replace("_", "-")]
        assert helps[field.name] and helps[field.name] in action.help, field.name
        literal = typing.get_args(hints[field.name])
        if typing.get_origin(hints[field.name]) is typing.Literal:
            assert tuple(action.choices) == literal, field.name
    assert flags["precision"].choices == ("auto", "bf16", "fp16", "fp32")
    assert flags["method"].choices == ("sora", "lora", "adalora")
    assert "(default: 0.1)" in flags["max_grad_norm"].help


def test_every_search_field_has_a_flag_in_a_group():
    fields = {f.name for f in dataclasses.fields(SearchConfig)} - {"space"}
    grouped = [name for names in SEARCH_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(fields) and len(grouped) == len(set(grouped))
    helps, flags = field_help(SearchConfig), actions("search")
    for name in grouped:  # the help is the field's trailing comment, on the field's own line
        assert helps.get(name) and helps[name] in flags[name].help, name
    flags = actions("search")
    assert fields <= set(flags)
    assert flags["sampler"].choices == ("tpe", "nsga2", "gp", "random")
    search = next(a for a in build_parser()._actions if a.choices).choices["search"]
    titles = [group.title for group in search._action_groups]
    assert [t for t in titles if t not in ("positional arguments", "options")] == [
        "search",
        "resources",
        "tracking",
        "trial",
    ]


def test_given_flags_only_reach_the_config(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["train", "--output-dir", "x", "--lr", "1e-3", "--group-by-length"])
    from sora_tune.cli import trial_values

    assert trial_values(args) == {"lr": 1e-3, "group_by_length": True}
    target = parser.parse_args(["train", "--output-dir", "x", "--target-modules", "query,value"])
    assert trial_values(target) == {"target_modules": ["query", "value"]}
    quantiles = parser.parse_args(["train", "--output-dir", "x", "--threshold-quantiles", "0.2,.5"])
    assert trial_values(quantiles) == {"threshold_quantiles": [0.2, 0.5]}


def test_version_on_every_command(capsys):
    for command in ([], ["train"], ["search"], ["pareto"], ["register"], ["predict"]):
        with pytest.raises(SystemExit) as stop:
            main([*command, "--version"])
        assert stop.value.code == 0
        assert capsys.readouterr().out.startswith("sora-tune 0.")


def test_resume_refuses_the_flags_it_would_ignore(tmp_path, capsys):
    code = main(["search", "--resume", "ray/s", "--num-samples", "4", "--lr", "1e-3"])
    assert code == 2
    assert capsys.readouterr().err.startswith(
        "sora-tune: error: --resume finishes the search as it was started: --lr, --num-samples "
        "cannot change it; leave them out (only --address applies)"
    )
