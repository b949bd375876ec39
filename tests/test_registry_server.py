"""End to end against a real `mlflow server` process: a tiny search logs its trials to it,
`register` chooses one and registers its adapter, and the model loads back by its alias."""

import mlflow
import pytest
import yaml

from sora_tune.registry import register
from sora_tune.tune import SearchConfig, load_search_space, run_search
from tests.test_registry import MRPC_LABELS, dev_rows, peft_logits
from tests.tune.conftest import local_ray  # noqa: F401 (a fixture, used below)

pytestmark = pytest.mark.usefixtures("local_ray")


def test_search_register_and_load_by_alias(mlflow_server, tiny_trial, tmp_path):
    # ξ this small prunes few ranks, so every trial exports an adapter.
    parameters = tiny_trial | {
        "epochs": 1,
        "xi": {"type": "loguniform", "low": 1e-5, "high": 1e-4},
        "r_max": {"type": "choice", "values": [2, 4]},
    }
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"parameters": parameters}))
    space = load_search_space(tmp_path / "space.yaml")
    config = SearchConfig(
        space=space,
        num_samples=3,
        mlflow_uri=mlflow_server.uri,
        experiment_name="served",
        storage_path=str(tmp_path / "ray"),
        name="served",
    )
    assert not run_search(config).results.errors

    first = register(
        experiment_name="served",
        name="tiny-mrpc",
        tracking_uri=mlflow_server.uri,
        output_dir=tmp_path,
    )
    assert first.version == 1 and first.model_uri == "models:/tiny-mrpc/1"
    mlflow.set_tracking_uri(mlflow_server.uri)
    client = mlflow.MlflowClient(mlflow_server.uri)
    run = client.get_run(first.run_id)
    assert run.data.tags["sora_tune.role"] == "trial" and run.data.tags["pareto"] == "true"

    model = mlflow.pyfunc.load_model("models:/tiny-mrpc@champion")
    rows = dev_rows(tiny_trial)
    predicted = model.predict(rows[["sentence1", "sentence2"]])["label"]
    # The trial's own evaluation: its adapter artifact on the base model, on the same rows.
    adapter = mlflow.artifacts.download_artifacts(
        run_id=first.run_id, artifact_path="adapter", dst_path=str(tmp_path / "trial")
    )
    logits = peft_logits(tiny_trial, adapter)
    assert predicted.tolist() == [MRPC_LABELS[i] for i in logits.argmax(dim=1)]
    accuracy = (predicted == [MRPC_LABELS[i] for i in rows["label"]]).mean()
    assert accuracy == pytest.approx(run.data.metrics["test_score"]) == first.test_score

    runs = client.search_runs([run.info.experiment_id], "tags.`sora_tune.role` = 'trial'")
    smallest = min(r.data.metrics["retained_params"] for r in runs)
    second = register(
        experiment_name="served",
        name="tiny-mrpc",
        tracking_uri=mlflow_server.uri,
        max_params=smallest,
        output_dir=tmp_path,
    )
    assert second.version == 2 and second.retained_params == smallest
    champion = client.get_model_version_by_alias("tiny-mrpc", "champion")
    assert int(champion.version) == 2
    assert champion.tags["source_run_id"] == second.run_id
    assert "champion" not in client.get_model_version("tiny-mrpc", "1").aliases
