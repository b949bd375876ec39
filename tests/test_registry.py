"""The registered pyfunc model on tiny adapters, against real MLflow stores (sqlite in a temporary
folder): its predictions against the PEFT model's own, its files, files in and out, selection and
registration from the command line."""

import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from sora_tune.cli import main
from sora_tune.data import get_task, load_glue, make_dataloader
from sora_tune.models import load_tokenizer
from sora_tune.registry import (
    PACKAGED_BACKBONE,
    _base_model_reference,
    log_trial_model,
    predict_file,
    register,
)
from sora_tune.tracking import create_trial_run, tracked_trial
from sora_tune.train import TrialConfig, prepare_data
from tests.conftest import MINILM_PATH

MRPC_LABELS = ["not_equivalent", "equivalent"]


def tiny_settings(glue: Path, model_dir: str | None, cache: Path, **changes) -> dict:
    """A trial of a few seconds (the `tiny_trial` settings, for module-scoped fixtures)."""
    return {
        "task": "mrpc",
        "data_dir": str(glue),
        "model": model_dir,
        "r_max": 4,
        "alpha": 8.0,
        "lr": 5e-3,
        "epochs": 1,
        "batch_size": 8,
        "max_length": 32,
        "val_size": 8,
        "cache_dir": str(cache),
        "train_eval_samples": 16,
    } | changes


def peft_logits(settings: dict, adapter: Path) -> torch.Tensor:
    """Logits of base model + adapter on the trial's test split, as the trial evaluated it."""
    config = TrialConfig.from_dict(settings)
    tokenizer = load_tokenizer(config)
    data = prepare_data(config, tokenizer)
    base = AutoModelForSequenceClassification.from_pretrained(
        config.model or MINILM_PATH, num_labels=get_task(config.task).num_labels
    )
    model = PeftModel.from_pretrained(base, adapter).eval()
    loader = make_dataloader(data["test"], tokenizer, batch_size=16, shuffle=False)
    with torch.no_grad():
        return torch.cat(
            [model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in loader]
        )


def dev_rows(settings: dict) -> pd.DataFrame:
    """The texts and labels of the trial's test split (GLUE dev), in order."""
    return load_glue(settings["task"], settings["data_dir"])["dev"].to_pandas()


def tracked(settings: dict, uri: str, output_dir: Path, experiment: str = "tiny") -> str:
    """Run a trial as `sora-tune train --mlflow-uri` does; returns its run id."""
    run_id = create_trial_run(uri, experiment)
    tracked_trial(
        TrialConfig.from_dict(settings), run_id=run_id, tracking_uri=uri, output_dir=output_dir
    )
    return run_id


def retained_params_of_runs(uri: str, experiment: str) -> list[float]:
    client = mlflow.MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return [r.data.metrics["retained_params"] for r in client.search_runs([experiment_id])]


@pytest.fixture(scope="module")
def store(tiny_glue, tiny_model_dir, tmp_path_factory):
    """A sqlite store with one experiment of two finished MRPC trials (r_max 4 and 2), recorded
    by `tracked_trial`, and the first one's adapter logged as a pyfunc model."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    trials = []
    for r_max in (4, 2):
        settings = tiny_settings(tiny_glue, tiny_model_dir, root / "cache", r_max=r_max)
        trials.append((settings, tracked(settings, uri, root / f"r{r_max}")))
    settings, run_id = trials[0]
    info = log_trial_model(run_id, tracking_uri=uri)
    return {
        "uri": uri,
        "settings": settings,
        "adapter": root / "r4" / "adapter",
        "run": mlflow.MlflowClient(uri).get_run(run_id),
        "model_uri": info.model_uri,
    }


@pytest.fixture
def model(store):
    mlflow.set_tracking_uri(store["uri"])
    return mlflow.pyfunc.load_model(store["model_uri"])


def test_pyfunc_gives_the_labels_of_the_peft_model(store, model):
    rows = dev_rows(store["settings"])
    logits = peft_logits(store["settings"], store["adapter"])
    expected = [MRPC_LABELS[i] for i in logits.argmax(dim=1)]

    predicted = model.predict(rows[["sentence1", "sentence2"]])
    assert list(predicted.columns) == [
        "label",
        "probability",
        "prob_not_equivalent",
        "prob_equivalent",
    ]
    assert predicted["label"].tolist() == expected
    probabilities = logits.double().softmax(dim=1).numpy()
    assert predicted[["prob_not_equivalent", "prob_equivalent"]].to_numpy() == pytest.approx(
        probabilities, abs=1e-5
    )
    assert predicted["probability"].to_numpy() == pytest.approx(probabilities.max(axis=1))
    accuracy = (predicted["label"] == [MRPC_LABELS[i] for i in rows["label"]]).mean()
    assert accuracy == pytest.approx(store["run"].data.metrics["test_score"])

    pairs = rows[["sentence1", "sentence2"]].values.tolist()
    assert model.predict(pairs)["label"].tolist() == expected
    assert model.predict(rows[["sentence2", "sentence1"]])["label"].tolist() == expected


def test_stsb_predicts_a_score(store, tiny_glue, tiny_model_dir, tmp_path):
    settings = tiny_settings(tiny_glue, tiny_model_dir, tmp_path / "cache", task="stsb")
    uri = store["uri"]
    run_id = tracked(settings, uri, tmp_path / "run", experiment="stsb")
    info = log_trial_model(run_id, tracking_uri=uri)
    mlflow.set_tracking_uri(uri)
    rows = dev_rows(settings)
    predicted = mlflow.pyfunc.load_model(info.model_uri).predict(rows[["sentence1", "sentence2"]])
    assert list(predicted.columns) == ["score"]
    expected = peft_logits(settings, tmp_path / "run" / "adapter")[:, 0].numpy()
    assert predicted["score"].to_numpy() == pytest.approx(expected, abs=1e-5)


def test_a_bf16_trial_serves_in_fp32_on_a_cpu_unless_asked(
    store, tiny_glue, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """A model whose trial scored in bf16 predicts in fp32 on a CPU (bf16 autocast is slower
    there); asking for `trial` predicts in the trial's bf16, which gives exactly the scores the
    run (and a registered version's tags) recorded."""
    settings = tiny_settings(
        tiny_glue, tiny_model_dir, tmp_path / "cache", task="stsb", precision="bf16"
    )
    run_id = tracked(settings, store["uri"], tmp_path / "run", experiment="bf16")
    run = mlflow.MlflowClient(store["uri"]).get_run(run_id)
    assert run.data.tags["sora_tune.precision"] == "bf16"
    info = log_trial_model(run_id, tracking_uri=store["uri"])
    assert info.metadata["precision"] == "bf16"
    mlflow.set_tracking_uri(store["uri"])
    rows = dev_rows(settings)[["sentence1", "sentence2"]]
    fp32 = peft_logits(settings, tmp_path / "run" / "adapter")[:, 0].numpy()

    served = mlflow.pyfunc.load_model(info.model_uri)
    assert served.unwrap_python_model().precision == "fp32"
    assert served.predict(rows)["score"].to_numpy() == pytest.approx(fp32, abs=1e-5)

    # Asked at load time, as MLflow passes settings to a model: `sora-tune predict --precision`.
    rows.to_csv(tmp_path / "rows.csv", index=False)
    code = main(["predict", "--model", info.model_uri, "--input", str(tmp_path / "rows.csv"),
                 "--precision", "trial", "--mlflow-uri", store["uri"]])  # fmt: skip
    assert code == 0
    as_trained = pd.read_csv(io.StringIO(capsys.readouterr().out))["score"]
    pearson = np.corrcoef(as_trained, dev_rows(settings)["label"])[0, 1]
    assert pearson == pytest.approx(run.data.metrics["test_score"], abs=1e-4)
    assert not np.allclose(as_trained, fp32, atol=1e-5), "bf16 differs from fp32"

    # Where no model_config can be given (`mlflow models serve`), MLflow's variable asks, and
    # so does ours of before; a model_config overrides them.
    monkeypatch.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", '{"precision": "trial"}')
    by_env = mlflow.pyfunc.load_model(info.model_uri).predict(rows)["score"]
    assert by_env.to_numpy() == pytest.approx(as_trained.to_numpy(), abs=1e-5)
    monkeypatch.delenv("MLFLOW_PYFUNC_INFERENCE_CONFIG")
    monkeypatch.setenv("SORA_TUNE_SERVING_PRECISION", "trial")
    assert mlflow.pyfunc.load_model(info.model_uri).unwrap_python_model().precision == "bf16"
    fp32_config = {"precision": "fp32"}
    assert mlflow.pyfunc.load_model(info.model_uri, model_config=fp32_config).predict(rows)[
        "score"
    ].to_numpy() == pytest.approx(fp32, abs=1e-5)
    with pytest.raises(
        ValueError, match="model_config precision must be auto, trial, bf16, fp16, fp32"
    ):
        predict_file(info.model_uri, tmp_path / "rows.csv", precision="int8")


def test_an_nf4_trial_is_registered_with_its_base_dtype_and_served_on_a_4bit_base(
    store, tiny_glue, tiny_model_dir, tmp_path, capsys
):
    """The registered version records base_dtype, and serving loads the base as the trial
    stored it: on a 4-bit base it predicts exactly the scores the run recorded.
    `sora-tune predict --base-dtype` loads it otherwise."""
    settings = tiny_settings(
        tiny_glue, tiny_model_dir, tmp_path / "cache", task="stsb", base_dtype="nf4"
    )
    run_id = tracked(settings, store["uri"], tmp_path / "run", experiment="nf4")
    run = mlflow.MlflowClient(store["uri"]).get_run(run_id)
    assert run.data.tags["sora_tune.base_dtype"] == "nf4"
    registered = register(experiment_name="nf4", name="tiny-nf4", tracking_uri=store["uri"])
    version = mlflow.MlflowClient(store["uri"]).get_model_version("tiny-nf4", registered.version)
    assert version.tags["base_dtype"] == "nf4"

    mlflow.set_tracking_uri(store["uri"])
    served = mlflow.pyfunc.load_model(registered.model_uri)
    assert served.metadata.metadata["unquantised"] == ["bert.pooler", "classifier"]
    adapter_model = served.unwrap_python_model()
    assert adapter_model.base_dtype == "nf4"
    requirements = Path(mlflow.pyfunc.get_model_dependencies(registered.model_uri)).read_text()
    assert "bitsandbytes==" in requirements
    assert {type(m).__name__ for m in adapter_model.model.modules()} >= {"Linear4bit"}
    rows = dev_rows(settings)[["sentence1", "sentence2"]]
    scores = served.predict(rows)["score"]
    pearson = np.corrcoef(scores, dev_rows(settings)["label"])[0, 1]
    assert pearson == pytest.approx(run.data.metrics["test_score"], abs=1e-4)

    rows.to_csv(tmp_path / "rows.csv", index=False)
    code = main(["predict", "--model", registered.model_uri, "--input", str(tmp_path / "rows.csv"),
                 "--base-dtype", "fp32", "--mlflow-uri", store["uri"]])  # fmt: skip
    assert code == 0
    on_fp32 = pd.read_csv(io.StringIO(capsys.readouterr().out))["score"]
    assert len(on_fp32) == len(rows) and not np.allclose(on_fp32, scores, atol=1e-5)


def test_bad_input_is_refused_with_a_clear_error(model):
    frame = pd.DataFrame({"sentence1": ["red blue", "old"], "sentence2": ["red blue", "new"]})
    with pytest.raises(MlflowException, match="declares 2 inputs"):
        model.predict(frame[["sentence1"]])
    with pytest.raises(MlflowException, match="declares 2 inputs"):
        model.predict(["texts without", "a second sentence"])
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['sentence2'\]"):
        model.predict(frame.rename(columns={"sentence2": "second"}))
    with pytest.raises(ValueError, match="sentence2 must be text; row 1"):
        model.predict([["red blue", "red blue"], ["old", None]])


def test_the_model_holds_no_pickle_and_only_safetensors_weights(store, tmp_path):
    mlflow.set_tracking_uri(store["uri"])
    local = Path(mlflow.artifacts.download_artifacts(store["model_uri"], dst_path=str(tmp_path)))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert {
        "MLmodel",
        "sora_pyfunc.py",
        "requirements.txt",
        "input_example.json",
        "artifacts/model_info.json",
        "artifacts/adapter/adapter_config.json",
        "artifacts/adapter/adapter_model.safetensors",
        "artifacts/tokenizer/tokenizer.json",
    } <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".bin", ".pt", ".pth"))]
    mlmodel = (local / "MLmodel").read_text()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel
    assert "python_model.pkl" not in mlmodel
    info = json.loads((local / "artifacts" / "model_info.json").read_text())
    assert info == {
        "task": "mrpc",
        "text_fields": ["sentence1", "sentence2"],
        "label_names": MRPC_LABELS,
        "problem_type": "single_label_classification",
        "metric": "accuracy",
        "max_length": 32,
        "base_model": store["settings"]["model"],
        "precision": "fp32",
        "base_dtype": "fp32",
        "unquantised": ["bert.pooler", "classifier"],
        "pair_separator": None,  # BERT's pair template separates the texts
    }
    requirements = (local / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} == {
        "mlflow",
        "torch",
        "transformers",
        "peft",
        "safetensors",
        "pandas",
    }
    logged = mlflow.get_logged_model(store["model_uri"].removeprefix("models:/"))
    assert logged.source_run_id == store["run"].info.run_id


def test_a_pickled_adapter_needs_allow_pickle(store, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes(
        (store["adapter"] / "adapter_config.json").read_bytes()
    )
    # PEFT's older format: the same tensors as a torch pickle.
    torch.save(
        load_file(store["adapter"] / "adapter_model.safetensors"), adapter / "adapter_model.bin"
    )
    client = mlflow.MlflowClient(store["uri"])
    run = store["run"]
    # Its own experiment: the store's is the one the selection tests choose from.
    run_id = client.create_run(client.create_experiment("pickled")).info.run_id
    for key, value in run.data.params.items():
        client.log_param(run_id, key, value)
    client.log_artifacts(run_id, str(adapter), "adapter")
    with pytest.raises(
        ValueError, match=r"lacks adapter_model.safetensors.*pickle.*--allow-pickle"
    ):
        log_trial_model(run_id, tracking_uri=store["uri"])

    info = log_trial_model(run_id, tracking_uri=store["uri"], allow_pickle=True)
    assert info.metadata["allow_pickle"] is True
    mlflow.set_tracking_uri(store["uri"])
    rows = dev_rows(store["settings"])[["sentence1", "sentence2"]]
    pickled = mlflow.pyfunc.load_model(info.model_uri).predict(rows)
    safe = mlflow.pyfunc.load_model(store["model_uri"]).predict(rows)
    assert pickled["label"].tolist() == safe["label"].tolist()


def test_the_packaged_backbone_is_named_by_its_package(store, tiny_glue, tmp_path):
    assert _base_model_reference(None) == PACKAGED_BACKBONE
    assert _base_model_reference(MINILM_PATH) == PACKAGED_BACKBONE
    assert _base_model_reference("org/some-model") == "org/some-model"

    # MiniLM is slower: one training step.
    settings = tiny_settings(tiny_glue, None, tmp_path / "cache", max_train_samples=8)
    uri = store["uri"]
    run_id = tracked(settings, uri, tmp_path / "run", experiment="minilm")
    info = log_trial_model(run_id, tracking_uri=uri)
    assert info.metadata["base_model"] == PACKAGED_BACKBONE
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(info.model_uri)
    expected = [
        MRPC_LABELS[i] for i in peft_logits(settings, tmp_path / "run" / "adapter").argmax(1)
    ]
    rows = dev_rows(settings)
    assert model.predict(rows[["sentence1", "sentence2"]])["label"].tolist() == expected


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", "-"])
def test_predict_file_reads_csv_tsv_and_jsonl(store, model, suffix, tmp_path, monkeypatch):
    rows = dev_rows(store["settings"])
    expected = model.predict(rows[["sentence1", "sentence2"]])["label"].tolist()
    # Extra columns, in another order, as a GLUE-like file has them.
    frame = rows.assign(idx=range(len(rows)))[["idx", "sentence2", "label", "sentence1"]]
    if suffix == "-":
        monkeypatch.setattr("sys.stdin", io.StringIO(frame.to_json(orient="records", lines=True)))
        source = "-"
    else:
        source = tmp_path / f"rows{suffix}"
        if suffix == ".jsonl":
            frame.to_json(source, orient="records", lines=True)
        else:
            frame.to_csv(source, sep="\t" if suffix == ".tsv" else ",", index=False)
    predicted = predict_file(store["model_uri"], source, tracking_uri=store["uri"])
    assert predicted["label"].tolist() == expected


def test_predict_file_errors(store, tmp_path):
    with pytest.raises(ValueError, match="expected a .csv, .tsv, .jsonl, .json, .parquet file"):
        predict_file(store["model_uri"], tmp_path / "rows.txt", tracking_uri=store["uri"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        predict_file(store["model_uri"], tmp_path / "missing.csv", tracking_uri=store["uri"])
    pd.DataFrame({"sentence1": ["a"], "second": ["b"]}).to_csv(tmp_path / "rows.csv", index=False)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['sentence2'\]"):
        predict_file(store["model_uri"], tmp_path / "rows.csv", tracking_uri=store["uri"])
    # An empty text is refused as training refuses it, naming the row.
    pd.DataFrame({"sentence1": ["a", "b"], "sentence2": ["b", ""]}).to_csv(
        tmp_path / "gaps.csv", index=False
    )
    with pytest.raises(
        ValueError,
        match=r"gaps.csv: column 'sentence2' has 1 empty or missing text cell\(s\), "
        "the first in row 2",
    ):
        predict_file(store["model_uri"], tmp_path / "gaps.csv", tracking_uri=store["uri"])
    with pytest.raises(ValueError, match="cannot load models:/nothing@champion"):
        predict_file("models:/nothing@champion", tmp_path / "rows.csv", tracking_uri=store["uri"])


def test_pareto_register_and_predict_from_the_command_line(store, tmp_path, capsys):
    uri = store["uri"]
    selection = ["--experiment", "tiny", "--mlflow-uri", uri, "--output-dir", str(tmp_path)]
    assert main(["pareto", *selection]) == 0
    out = capsys.readouterr().out
    assert "hypervolume" in out and "selected" in out
    assert (tmp_path / "pareto.csv").exists() and (tmp_path / "pareto.png").exists()

    assert main(["register", "--name", "tiny-mrpc", *selection]) == 0
    out = capsys.readouterr().out
    assert "version 1" in out and "models:/tiny-mrpc@champion" in out

    smallest = min(retained_params_of_runs(uri, "tiny"))
    assert main(["register", "--name", "tiny-mrpc", "--max-params", str(smallest), *selection]) == 0
    assert "version 2" in capsys.readouterr().out
    client = mlflow.MlflowClient(uri)
    champion = client.get_model_version_by_alias("tiny-mrpc", "champion")
    assert int(champion.version) == 2
    run = client.get_run(champion.tags["source_run_id"])
    assert champion.tags["retained_params"] == str(int(run.data.metrics["retained_params"]))
    assert champion.tags["task"] == "mrpc"
    assert champion.tags["selection_rule"].startswith("best val_score with retained_params")
    assert champion.tags["precision"] == "fp32"  # what its scores were measured in
    ranks = json.loads(champion.tags["rank_pattern"])
    assert sum(ranks.values()) == run.data.metrics["nonzero_rank"]
    assert champion.run_id == run.info.run_id

    rows = dev_rows(store["settings"])[["sentence1", "sentence2"]]
    rows.to_csv(tmp_path / "rows.csv", index=False)
    command = ["predict", "--model", "models:/tiny-mrpc@champion", "--input"]
    assert main([*command, str(tmp_path / "rows.csv"), "--mlflow-uri", uri]) == 0
    printed = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert len(printed) == len(rows) and set(printed["label"]) <= set(MRPC_LABELS)


def test_register_refuses_a_run_without_an_adapter(store, tiny_glue, tiny_model_dir, tmp_path):
    uri = store["uri"]
    # A threshold far above every gate prunes every rank: the trial exports no adapter.
    settings = tiny_settings(tiny_glue, tiny_model_dir, tmp_path / "cache", xi=10.0)
    run_id = tracked(settings, uri, tmp_path / "run", experiment="pruned")
    assert mlflow.MlflowClient(uri).get_run(run_id).data.metrics["retained_params"] == 0
    # A point pruned to rank 0 is no candidate (nothing to register), so no front is left.
    with pytest.raises(
        ValueError, match=r"no finished sora run .* \(0 baseline runs, 1 left out\)"
    ):
        register(experiment_name="pruned", name="pruned", tracking_uri=uri, output_dir=tmp_path)


def test_a_search_run_of_another_experiment_is_refused(store, tmp_path):
    client = mlflow.MlflowClient(store["uri"])
    other = client.create_experiment("other")
    search = client.create_run(other, tags={"sora_tune.role": "search"}).info.run_id
    with pytest.raises(ValueError, match="belongs to experiment 'other', not 'tiny'"):
        register(
            experiment_name="tiny",
            parent_run_id=search,
            name="tiny-mrpc",
            tracking_uri=store["uri"],
            output_dir=tmp_path,
        )
