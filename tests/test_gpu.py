"""What only a GPU machine can show: the device a trial uses, each precision and base dtype on
CUDA, a resume across devices, two trials sharing one GPU. Marked `gpu` and skipped without CUDA
(see tests/conftest.py); `pytest -m gpu` runs them, as scripts/gpu_check.sh does."""

import os

import mlflow
import pytest
import torch

from sora_tune.models import resolve_base_dtype
from sora_tune.train import latest_checkpoint, resolve_precision, train_trial
from sora_tune.tune import run_search
from tests.conftest import stop_after
from tests.tune.conftest import search_in, tiny_search_parameters

pytestmark = pytest.mark.gpu
# cuBLAS is deterministic only with a fixed workspace; read when the first handle is made.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(scope="module")
def local_gpu_ray():
    """A local Ray that knows this machine's GPUs (as `ray.init` does by default)."""
    import ray

    ray.init(num_cpus=2, num_gpus=torch.cuda.device_count(), include_dashboard=False)
    yield
    ray.shutdown()


def test_auto_precision_is_bf16_where_the_gpu_has_it_natively():
    device = torch.device("cuda:0")
    # Native bf16 from compute capability 8.0 (Ampere); a T4 (7.5) or V100 (7.0) emulates it.
    expected = "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp32"
    assert resolve_precision("auto", device) == expected


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16", "fp32"])
def test_each_precision_trains_on_cuda(tiny_trial, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    result = train_trial(tiny_trial | {"precision": precision}, output_dir=tmp_path, device="cuda")
    assert result["status"] == "finished"
    assert result["precision"] == resolve_precision(precision, torch.device("cuda:0"))
    state = torch.load(latest_checkpoint(tmp_path) / "trainer_state.pt", weights_only=True)
    assert bool(state["scaler"]) == (result["precision"] == "fp16")


@pytest.mark.parametrize("base_dtype", ["auto", "bf16", "fp16", "int8", "nf4"])
def test_each_base_dtype_trains_on_cuda(tiny_trial, tmp_path, base_dtype):
    """bitsandbytes' CUDA kernels, and `auto` on this GPU: bf16 where native, else fp16."""
    if base_dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    settings = tiny_trial | {"base_dtype": base_dtype, "gradient_checkpointing": True}
    result = train_trial(settings, output_dir=tmp_path, device="cuda")
    assert result["status"] == "finished"
    assert result["base_dtype"] == resolve_base_dtype(base_dtype, torch.device("cuda:0"))


@pytest.fixture
def deterministic():
    """torch refuses a nondeterministic kernel instead of running it."""
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("first, second", [("cuda", "cuda"), ("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_resumes_on_another_device(deterministic, tiny_trial, tmp_path, first, second):
    """A trial checkpointed on a GPU node resumes on a CPU node, and back (fp32 on both, so the
    runs stay comparable), and on the same GPU exactly as if it had not stopped."""
    trial = tiny_trial | {"precision": "fp32", "epochs": 3}
    Stop, report = stop_after(1)
    with pytest.raises(Stop):
        train_trial(trial, report=report, output_dir=tmp_path, device=first)
    resumed = train_trial(trial, output_dir=tmp_path, device=second)
    assert resumed["status"] == "finished" and [m["epoch"] for m in resumed["history"]] == [1, 2, 3]
    full = train_trial(trial, output_dir=tmp_path / "full", device=second)
    assert resumed["retained_params"] == full["retained_params"]
    # With deterministic kernels (the fixture; cuBLAS's workspace pinned above) a resume on the
    # same device repeats every float, as on the CPU (tests/test_train.py). Across
    # devices only the first epoch differs, by how CPU and CUDA round their sums: the losses
    # agree to rounding, while val_score on 8 rows moves in steps of 0.125, so it is compared
    # only on the same device (a 0.2 tolerance there passed any one flipped prediction).
    same = first == second
    for key in ("train_loss", "val_score", "test_score"):
        if same or key == "train_loss":
            for a, b in zip(resumed["history"], full["history"], strict=True):
                assert a[key] == pytest.approx(b[key], rel=1e-6 if same else 1e-3), key


def test_trials_use_the_device_ray_assigned(local_gpu_ray, tiny_trial, write_space, tmp_path):
    """A trial given a GPU trains on it; one given none trains on the CPU, although the node's
    GPU is visible to it (Ray no longer hides GPUs from 0-GPU actors)."""
    _, space = write_space(tiny_search_parameters(tiny_trial) | {"epochs": 1})
    for gpus, device in ((1.0, "cuda:0"), (0.0, "cpu")):
        config, uri = search_in(
            tmp_path, space, f"gpus-{gpus:g}", num_samples=1, gpus_per_trial=gpus
        )
        assert not run_search(config).results.errors
        (run,) = mlflow.MlflowClient(uri).search_runs(
            [mlflow.MlflowClient(uri).get_experiment_by_name(f"gpus-{gpus:g}").experiment_id],
            "tags.`sora_tune.role` = 'trial'",
        )
        assert run.data.tags["sora_tune.device"] == device


def test_two_trials_share_one_gpu(local_gpu_ray, tiny_trial, write_space, tmp_path):
    _, space = write_space(tiny_search_parameters(tiny_trial) | {"epochs": 8})
    config, uri = search_in(
        tmp_path, space, "shared", num_samples=2, gpus_per_trial=0.5, cpus_per_trial=1
    )
    assert not run_search(config).results.errors
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("shared").experiment_id], "tags.`sora_tune.role` = 'trial'"
    )
    assert [r.data.tags["sora_tune.device"] for r in runs] == ["cuda:0", "cuda:0"]
    first, second = sorted(runs, key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time, "the two trials ran at the same time"


def trial_runs(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(uri)
    return client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        "tags.`sora_tune.role` = 'trial'",
    )


def test_auto_shares_cap_each_trial_and_record_its_peak(
    local_gpu_ray, tiny_trial, write_space, tmp_path, capsys
):
    """`gpus_per_trial auto` on this GPU, its memory asked of it: each trial is capped at its
    share, records its measured peak beside its estimate, and the search's end prints the worst
    ratio."""
    from sora_tune.cli import search_summary

    _, space = write_space(tiny_search_parameters(tiny_trial) | {"epochs": 1})
    config, uri = search_in(tmp_path, space, "capped", num_samples=2, gpus_per_trial="auto")
    search = run_search(config)
    assert not search.results.errors
    total = torch.cuda.get_device_properties(0).total_memory
    for run in trial_runs(uri, "capped"):
        share = float(run.data.params["gpu_share"])
        assert 0 < share <= 1 and (share * 8).is_integer()
        cap = int(run.data.params["gpu_memory_cap"])
        assert cap == int(share * total)
        assert 0 < run.data.metrics["gpu_memory_peak"] <= cap
    assert "GPU memory: measured peak / estimate (tensors) at most" in search_summary(search)


def test_a_trial_over_its_cap_fails_alone(local_gpu_ray, tiny_trial, write_space, tmp_path):
    """Two trials, each capped at 192 MiB of the GPU: the tiny BERT trains within it; a BERT
    with 1024 hidden units (about 330 MB of fp32 weights) runs out when its weights move to the
    GPU. Its run is FAILED with the estimate and the cap, Ray does not retry it, and the other
    trial finishes."""
    from transformers import BertConfig, BertModel

    big = tmp_path / "big-bert"
    config = BertConfig(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16,
                        intermediate_size=1024, max_position_embeddings=128)  # fmt: skip
    BertModel(config).save_pretrained(big)
    for file in (tmp_path / "tiny-bert").iterdir():  # the tokenizer's files
        if file.name not in ("config.json", "model.safetensors"):
            (big / file.name).write_bytes(file.read_bytes())
    parameters = tiny_trial | {
        "epochs": 1,
        "precision": "fp32",
        "base_dtype": "fp32",
        "model": {"type": "choice", "values": ["tiny-bert", "big-bert"]},
        "xi": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
    }
    points = [{"model": model, "xi": 1e-3} for model in ("tiny-bert", "big-bert")]
    _, space = write_space(parameters, points=points)
    total = torch.cuda.get_device_properties(0).total_memory
    config, uri = search_in(
        tmp_path, space, "over", num_samples=2, gpus_per_trial=192 * 2**20 / total
    )
    search = run_search(config)
    runs = {run.data.params["model"].rsplit("/", 1)[-1]: run for run in trial_runs(uri, "over")}
    assert runs["tiny-bert"].info.status == "FINISHED"
    failed = runs["big-bert"]
    assert failed.info.status == "FAILED"
    reason = failed.data.tags["failure_reason"]
    assert "out of GPU memory: estimated" in reason and "cap 192.00 MiB" in reason
    assert not search.results.errors, "the trial failed in its run, not by raising to Ray"


def test_the_step_benchmark_runs_on_cuda(tmp_path):
    from tests.test_bench_scripts import load_script

    result = load_script("bench_step").main(
        ["--device", "cuda", "--rounds", "1", "--steps", "1", "--batch-size", "2", "--length", "16",
         "--output", str(tmp_path / "step.json")]
    )  # fmt: skip
    assert result["machine"]["device"] == torch.cuda.get_device_name("cuda")
    assert set(result["median_ms"]) == {"sora", "lora", "adalora"}


def test_a_trial_is_timed_on_cuda_as_it_trains_there(tiny_trial):
    """What `reproduce.py --preset gpu` sizes its batch from: a trial's speed on the GPU, in the
    precision it would train in there."""
    from sora_tune.config import TrialConfig
    from sora_tune.experiments import measure_speed
    from sora_tune.train import prepare_data

    config = TrialConfig.from_dict(tiny_trial)
    data = prepare_data(config)
    speed = measure_speed(config, data, steps=3, warmup=1, device="cuda")
    assert 0 < speed.step_s < 10 and 0 < speed.eval_row_s < 1 and speed.setup_s > 0
    assert speed.steps_per_epoch == -(-len(data["train"]) // config.batch_size)
    assert speed.eval_rows == len(data["train_eval"]) + len(data["val"]) + len(data["test"])
