"""The helper scripts start what they say, listening on 127.0.0.1 only, and stop all of it."""

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
MLFLOW_SERVER = REPO / "scripts" / "mlflow_server.sh"
LOCAL_CLUSTER = REPO / "scripts" / "cluster" / "local_cluster.sh"


def script_env(**extra: str) -> dict[str, str]:
    """This environment's python, mlflow and ray first on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return os.environ | {"PATH": path, "PYTHON": sys.executable} | extra


def session_processes(session_id: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session_id:
                found.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return found


def listening_addresses(processes: list[psutil.Process]) -> set[str]:
    addresses = set()
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
        except psutil.Error:
            continue
        addresses |= {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN}
    return addresses


def run(script: Path, *args: str, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(script), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("script", [MLFLOW_SERVER, LOCAL_CLUSTER])
def test_help_and_usage_errors(script):
    assert run(script, "--help", env=script_env()).returncode == 0
    bad = run(script, "launch", env=script_env())
    assert bad.returncode == 2 and "Usage" in bad.stderr


def test_mlflow_server_on_loopback_starts_and_stops(tmp_path):
    state, port = tmp_path / "state", free_port()
    env = script_env()
    started = run(MLFLOW_SERVER, "start", "--state-dir", str(state), "--port", str(port), env=env)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"http://127.0.0.1:{port}" in started.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as health:
            assert health.status == 200
        session = int((state / "server.pid").read_text())
        processes = session_processes(session)
        assert listening_addresses(processes) == {"127.0.0.1"}
        assert run(MLFLOW_SERVER, "status", "--state-dir", str(state), env=env).returncode == 0
        assert (state / "mlflow.db").exists()
    finally:
        stopped = run(MLFLOW_SERVER, "stop", "--state-dir", str(state), env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert session_processes(session) == []
    assert run(MLFLOW_SERVER, "status", "--state-dir", str(state), env=env).returncode == 1


def test_mlflow_server_refuses_basic_auth_without_credentials(tmp_path):
    env = script_env()
    env.pop("MLFLOW_TRACKING_USERNAME", None)
    refused = run(MLFLOW_SERVER, "start", "--basic-auth", "--state-dir", str(tmp_path), env=env)
    assert refused.returncode == 2
    assert "MLFLOW_TRACKING_USERNAME" in refused.stderr
    assert not (tmp_path / "server.pid").exists()


@pytest.fixture
def cluster_dir():
    # Short: Ray's unix sockets live under it, and socket paths are limited to ~107 characters.
    folder = Path(tempfile.mkdtemp(prefix="sora-lc-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(
    importlib.util.find_spec("aiohttp_cors") is not None,
    reason="ray[default] is installed: its dashboard listens beyond loopback (docs/cluster.md)",
)
def test_local_cluster_on_loopback_starts_and_stops(cluster_dir):
    env = script_env(SORA_LOCAL_CLUSTER_DIR=str(cluster_dir))
    port = str(free_port())
    try:
        started = run(LOCAL_CLUSTER, "start", "2", "--port", port, env=env, timeout=300)
        assert started.returncode == 0, started.stdout + started.stderr
        assert "ray-start mode" in started.stdout  # a real join, not the in-process fallback
        address = (cluster_dir / "address").read_text().strip()
        assert address == f"127.0.0.2:{port}"
        sessions = [int(s) for s in (cluster_dir / "pids").read_text().split()]
        # A driver connects as docs/cluster.md says: with the env file loaded.
        probe = subprocess.run(
            [
                "bash",
                "-c",
                f"source {cluster_dir / 'env'} && {sys.executable} -c '{NODES}' \"$RAY_ADDRESS\"",
            ],
            env=script_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert probe.returncode == 0, probe.stderr
        assert probe.stdout.split()[-2:] == ["3", "127.0.0.2"]  # head + 2 workers, on loopback
        # Everything listens on the loopback address, but for Ray's own gRPC servers, which bind
        # every interface whatever the node address (token authentication guards them). With
        # ray[default] (the dashboard extra, not installed by dev) more do: see docs/cluster.md.
        for process in [p for session in sessions for p in session_processes(session)]:
            for ip in listening_addresses([process]):
                assert ip.startswith("127.") or process.name() in ("gcs_server", "raylet"), (
                    f"{process.name()} listens on {ip}"
                )
    finally:
        sessions = (
            [int(s) for s in (cluster_dir / "pids").read_text().split()]
            if (cluster_dir / "pids").exists()
            else []
        )
        stopped = run(LOCAL_CLUSTER, "stop", env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert sessions and [p for s in sessions for p in session_processes(s)] == []
    assert not (cluster_dir / "tmp" / "ray" / "ray_current_cluster").exists()


# Prints the number of alive nodes and their addresses.
NODES = (
    "import sys, ray; ray.init(address=sys.argv[1], logging_level=40); "
    'alive = [n for n in ray.nodes() if n["Alive"]]; '
    'print(len(alive), *sorted({n["NodeManagerAddress"] for n in alive}))'
)
