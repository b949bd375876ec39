"""End to end against a real `mlflow server` process: a tiny search logs its trials to it,
`register` chooses one and registers its adapter, and the model loads back by its alias."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest
import yaml

from sora_tune.registry import register
from sora_tune.tune import SearchConfig, load_search_space, run_search
from tests.conftest import free_port
from tests.test_registry import MRPC_LABELS, dev_rows, peft_logits
from tests.tune.conftest import local_ray  # noqa: F401 (a fixture, used below)

pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free local port: a sqlite backend and proxied artifacts (clients
    upload through the server, as from another machine) in a temporary folder. Stopped by its
    process group at teardown."""
    root = tmp_path_factory.mktemp("mlflow-server")
    uri = f"http://127.0.0.1:{free_port()}"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        uri.rsplit(":", 1)[1],
        "--workers",
        "1",
    ]
    env = os.environ | {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 90
        while not _healthy(uri):
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not ready in 90 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


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
        mlflow_uri=mlflow_server,
        experiment_name="served",
        storage_path=str(tmp_path / "ray"),
        name="served",
    )
    assert not run_search(config).errors

    first = register(
        experiment_name="served", name="tiny-mrpc", tracking_uri=mlflow_server, output_dir=tmp_path
    )
    assert first.version == 1 and first.model_uri == "models:/tiny-mrpc/1"
    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient(mlflow_server)
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
        tracking_uri=mlflow_server,
        max_params=smallest,
        output_dir=tmp_path,
    )
    assert second.version == 2 and second.retained_params == smallest
    champion = client.get_model_version_by_alias("tiny-mrpc", "champion")
    assert int(champion.version) == 2
    assert champion.tags["source_run_id"] == second.run_id
    assert "champion" not in client.get_model_version("tiny-mrpc", "1").aliases
