"""Search spaces as YAML, checked before anything starts.

    parameters:
      xi:    {type: loguniform, low: 1.0e-5, high: 1.0e-3}
      r_max: {type: choice, values: [4, 8, 16, 32]}
      lr:    {type: loguniform, low: 1.0e-4, high: 2.0e-3}
      epochs: 3                      # a fixed value
    points_to_evaluate:              # optional: the first trials, e.g. the paper's defaults
      - {xi: 1.0e-4, r_max: 8, lr: 8.0e-4}

Parameter names are the fields of `TrialConfig` (the same names as the CLI flags and MLflow params).
Types: `loguniform` / `uniform` (`low`, `high`), `int` (`low`, `high` inclusive, optional
`log: true`) and `choice` (`values`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from ..config import TrialConfig, absolute_path, resolve_paths

DISTRIBUTIONS = {
    "loguniform": ("low", "high"),
    "uniform": ("low", "high"),
    "int": ("low", "high", "log"),
    "choice": ("values",),
}
TOP_LEVEL_KEYS = ("parameters", "points_to_evaluate")
# Settings that take whole numbers (epochs, r_max, ...): searched as `int` or `choice` only.
WHOLE_NUMBERS = {
    name for name, hint in get_type_hints(TrialConfig).items() if hint in (int, int | None)
}


@dataclass
class SearchSpace:
    """A validated search space: the searched `distributions` and the `fixed` values."""

    distributions: dict[str, dict[str, Any]] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)

    def with_fixed(self, overrides: dict[str, Any]) -> SearchSpace:
        """Fix the given parameters (CLI flags win over the YAML), searched or not."""
        distributions = {k: v for k, v in self.distributions.items() if k not in overrides}
        points = [
            {k: v for k, v in p.items() if k not in overrides} for p in self.points_to_evaluate
        ]
        space = SearchSpace(distributions, self.fixed | overrides, [p for p in points if p])
        space.validate("overrides")
        return space

    def values(self, name: str) -> list[Any]:
        """Every value setting `name` can take in this space's trials: its choices, or its fixed
        value (`TrialConfig`'s default when the space leaves it out)."""
        if name in self.distributions:
            return list(self.distributions[name].get("values", []))
        return [self.fixed.get(name, getattr(TrialConfig, name))]

    def largest(self, name: str) -> Any:
        """The largest value setting `name` takes in this space's trials: its high bound, its
        largest choice, or its fixed value (`epochs`: the search's budget)."""
        spec = self.distributions.get(name)
        return spec["high"] if spec and "high" in spec else max(self.values(name))

    def representative(self) -> dict[str, Any]:
        """The fixed values, with every searched parameter at its first candidate (its first
        choice, or its low bound): the settings of one trial of this space."""
        return self.fixed | {
            name: _candidates(spec)[0] for name, spec in self.distributions.items()
        }

    def with_resolved_paths(self) -> SearchSpace:
        """The space with every path setting absolute (see `train.resolve_paths`), fixed, chosen
        from or a starting point, so trials read the files the user named from their folder."""
        distributions = {
            name: spec | {"values": [absolute_path(name, v) for v in spec["values"]]}
            if spec["type"] == "choice"
            else spec
            for name, spec in self.distributions.items()
        }
        fixed = {k: v for k, v in resolve_paths(self.fixed).items() if k not in distributions}
        points = [{k: absolute_path(k, v) for k, v in p.items()} for p in self.points_to_evaluate]
        return SearchSpace(distributions, fixed, points)

    def to_tune(self) -> dict[str, Any]:
        """The Ray Tune `param_space`: a `tune` domain per searched parameter, fixed values as is."""
        from ray import tune

        space: dict[str, Any] = dict(self.fixed)
        for name, spec in self.distributions.items():
            kind = spec["type"]
            if kind == "loguniform":
                space[name] = tune.loguniform(spec["low"], spec["high"])
            elif kind == "uniform":
                space[name] = tune.uniform(spec["low"], spec["high"])
            elif kind == "int":
                sampler = tune.lograndint if spec.get("log") else tune.randint
                space[name] = sampler(
                    spec["low"], spec["high"] + 1
                )  # Ray's upper bound is exclusive
            else:
                space[name] = tune.choice(spec["values"])
        return space

    def validate(self, source: str) -> None:
        """Check every distribution, fixed value and starting point; errors name the key.

        Raises:
            ValueError: an unknown parameter or type, an empty choice, bad bounds, or a value that
                `TrialConfig` refuses (negative λ or ξ, r_max < 1, …).
        """
        known = {f.name for f in dataclasses.fields(TrialConfig)}
        for name in [*self.distributions, *self.fixed]:
            if name not in known:
                raise ValueError(
                    f"{source}: unknown parameter {name!r} (known: {', '.join(sorted(known))})"
                )
        for name, spec in self.distributions.items():
            _check_distribution(source, name, spec)
        # The fixed values first, so a bad one is reported as itself, not under a searched key.
        # Some are valid only with a searched one (a rising schedule's searched xi_max): then
        # every searched parameter takes its first candidate beside them.
        context = dict(self.fixed)
        try:
            TrialConfig.from_dict(context)
        except ValueError:
            context = self.representative()
            try:
                TrialConfig.from_dict(context)
            except ValueError:
                _check_trial(source, "parameters", self.fixed)  # raises, naming the fixed value
        # Every bound and choice must make a valid trial: TrialConfig names the field it refuses.
        for name, spec in self.distributions.items():
            for value in _candidates(spec):
                _check_trial(source, f"parameters.{name}", context | {name: value})
        for index, point in enumerate(self.points_to_evaluate):
            where = f"points_to_evaluate[{index}]"
            if not isinstance(point, dict):
                raise ValueError(f"{source}: {where} must be a mapping of parameter: value")
            outside = sorted(set(point) - set(self.distributions))
            if outside:
                raise ValueError(f"{source}: {where} sets {outside}, which are not searched")
            left = sorted(set(self.distributions) - set(point))
            if left:  # Optuna takes a starting point only whole
                raise ValueError(
                    f"{source}: {where} leaves out {left}: give every searched parameter a value"
                )
            _check_trial(source, where, self.fixed | point)


def _check_distribution(source: str, name: str, spec: Any) -> None:
    where = f"{source}: parameters.{name}"
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"{where} must be a fixed value or a mapping with a 'type'")
    kind = spec["type"]
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"{where}: unknown type {kind!r} (one of {', '.join(DISTRIBUTIONS)})")
    if kind in ("uniform", "loguniform") and name in WHOLE_NUMBERS:
        raise ValueError(f"{where}: {name} takes whole numbers: use type int or choice")
    extra = sorted(set(spec) - {"type", *DISTRIBUTIONS[kind]})
    if extra:
        raise ValueError(f"{where}: unknown key(s) {extra} for type {kind}")
    if kind == "choice":
        if not isinstance(spec.get("values"), list) or not spec["values"]:
            raise ValueError(f"{where}: choice needs a non-empty list 'values'")
        return
    low, high = spec.get("low"), spec.get("high")
    numbers = (int,) if kind == "int" else (int, float)
    for bound, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, numbers) or not math.isfinite(value):
            raise ValueError(
                f"{where}: '{bound}' must be a finite {'integer' if kind == 'int' else 'number'}, got {value!r}"
            )
    if not low < high:
        raise ValueError(f"{where}: low ({low}) must be < high ({high})")
    if (kind == "loguniform" or spec.get("log")) and low <= 0:
        raise ValueError(f"{where}: a log scale needs low > 0, got {low}")


def _candidates(spec: dict[str, Any]) -> list[Any]:
    """The values of a distribution that are checked: every choice, or both bounds."""
    return list(spec["values"]) if spec["type"] == "choice" else [spec["low"], spec["high"]]


def _check_trial(source: str, where: str, values: dict[str, Any]) -> None:
    try:
        TrialConfig.from_dict(values)
    except ValueError as err:
        raise ValueError(f"{source}: {where}: {err}") from None


def shipped_spaces() -> dict[str, Path]:
    """The search spaces that come with sora-tune, by name: `search_spaces/` of a source
    checkout (an editable install), or where a wheel installs them (`share/sora-tune/`)."""
    folders = (
        Path(__file__).resolve().parents[2] / "search_spaces",
        Path(sys.prefix) / "share" / "sora-tune" / "search_spaces",
    )
    return {
        p.stem: p for folder in reversed(folders) if folder.is_dir() for p in folder.glob("*.yaml")
    }


def find_search_space(name: str | os.PathLike) -> Path:
    """A search space by path, or by the name of a shipped one (`quickstart`, `sora_glue`).

    Raises:
        FileNotFoundError: neither a file nor a shipped space, naming the shipped ones.
    """
    path = Path(name).expanduser()
    if path.is_file():
        return path
    shipped = shipped_spaces()
    if path.stem in shipped and path.parent == Path("."):
        return shipped[path.stem]
    raise FileNotFoundError(
        f"no search space {str(name)!r}: not a file, nor one of the shipped spaces "
        f"({', '.join(sorted(shipped)) or 'none found'})"
    )


def load_search_space(path: str | os.PathLike) -> SearchSpace:
    """Read and validate a search-space YAML file, given by path or by a shipped space's name
    (`find_search_space`).

    Raises:
        FileNotFoundError: no such file or shipped space.
        ValueError: malformed YAML (with its line) or an invalid space (naming the key).
    """
    path = find_search_space(path)
    with open(path) as handle:
        text = handle.read()
    try:
        document = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}: malformed YAML{line}: {getattr(err, 'problem', err)}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a mapping with 'parameters'")
    unknown = sorted(set(document) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ValueError(
            f"{path}: unknown top-level key(s) {unknown} (allowed: {', '.join(TOP_LEVEL_KEYS)})"
        )
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ValueError(f"{path}: 'parameters' must be a mapping")
    space = SearchSpace(
        distributions={k: v for k, v in parameters.items() if isinstance(v, dict)},
        fixed={k: v for k, v in parameters.items() if not isinstance(v, dict)},
        points_to_evaluate=list(document.get("points_to_evaluate") or []),
    )
    space.validate(str(path))
    return space
