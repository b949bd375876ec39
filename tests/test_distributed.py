"""A trial on two data-parallel workers (torch.distributed on gloo, two processes) is the trial
on one: the same loss curve, scores, gates, pruned ranks and exported adapter, whether each
worker holds the whole base or a shard of it (`shard_base`, FSDP2). No Ray here: `train.py` sees
torch.distributed only, and the Ray Train path is tested by the search (tests/tune/test_workers.py).
"""

import contextlib
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

from sora_tune.config import TrialConfig, check_batch_size
from sora_tune.distributed import Workers
from sora_tune.models import load_tokenizer
from sora_tune.train import (
    build_trial,
    latest_checkpoint,
    prepare_data,
    seed_everything,
    train_steps,
    train_trial,
)
from tests.conftest import free_port, tiny_bert


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory, tokenizer) -> str:
    """The tiny random BERT without dropout: N workers draw other dropout masks than one process
    (each rank its own stream), so only a model without dropout can agree to 1e-5."""
    folder = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    config = tiny_bert().config
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    BertModel(BertConfig.from_dict(config.to_dict())).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def parity_trial(tiny_trial, no_dropout_model) -> dict:
    """Two epochs of 41 training rows at batch 8: 6 steps an epoch, the last of one row, so one
    worker's share of it is empty; evaluated every 2 steps (the loss curve), scored in
    batches of 4 spread over the workers; ξ large enough that some ranks are pruned."""
    return tiny_trial | {
        "model": no_dropout_model,
        "epochs": 2,
        "val_size": 7,
        "eval_steps": 2,
        "eval_batch_size": 4,
        "xi": 2e-3,
    }


class Stop(Exception):
    pass


def stop_inside_the_first_epoch(metrics: dict, checkpoint: str | None) -> None:
    if metrics["evaluation"] == 2:  # step 4 of the first epoch's 6
        raise Stop


def _worker(rank: int, size: int, port: int, settings: dict, out: str) -> None:
    """One of `size` workers: the trial through `train_trial`; the trial stopped after its 2nd
    evaluation (inside the first epoch) and resumed from rank 0's checkpoint; then the same
    training through the loop's parts (`build_trial`, `train_steps`) to read this rank's gates."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size
    )
    try:
        workers = Workers.current()
        reports = []
        result = train_trial(
            settings,
            report=lambda metrics, checkpoint: reports.append(checkpoint),
            output_dir=os.path.join(out, f"trial-{rank}"),
            workers=workers,
            device="cpu",
        )
        with contextlib.suppress(Stop):
            train_trial(
                settings,
                report=stop_inside_the_first_epoch,
                output_dir=os.path.join(out, f"stopped-{rank}"),
                workers=workers,
                device="cpu",
            )
        dist.barrier()  # rank 0's checkpoint is written
        resumed = train_trial(
            settings,
            output_dir=os.path.join(out, f"resumed-{rank}"),
            resume_from=latest_checkpoint(os.path.join(out, "stopped-0")),
            workers=workers,
            device="cpu",
        )
        config = TrialConfig.from_dict(settings)
        data = prepare_data(config)
        seed_everything(config.seed)
        trial = build_trial(
            config,
            data,
            load_tokenizer(config),
            device=torch.device("cpu"),
            precision="fp32",
            workers=workers,
        )
        train_steps(
            trial.model,
            trial.train_loader,
            trial.optimization,
            config=config,
            start=0,
            end=config.epochs * trial.steps_per_epoch,
            device=torch.device("cpu"),
            precision="fp32",
        )
        gates = {n: p.detach() for n, p in trial.model.named_parameters() if "sora_gate" in n}
        torch.save(gates, os.path.join(out, f"gates-{rank}.pt"))
        summary = {"status": result["status"], "reports": reports}
        if workers.main:
            summary["result"] = {k: result[k] for k in ("history", "rank_pattern", "val_score")}
            summary["resumed"] = resumed["history"]
        with open(os.path.join(out, f"result-{rank}.json"), "w") as file:
            json.dump(summary, file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shard_base", [False, True], ids=["replicated", "sharded-base"])
def test_two_workers_train_as_one_process(parity_trial, shard_base, tmp_path):
    one = train_trial(parity_trial, output_dir=tmp_path / "one", device="cpu")
    two = tmp_path / "two"
    two.mkdir()
    settings = parity_trial | {"shard_base": shard_base}
    # Forked, not spawned: a spawned worker would import torch and transformers again (~10 s).
    mp.start_processes(
        _worker, args=(2, free_port(), settings, str(two)), nprocs=2, start_method="fork"
    )
    ranks = [json.loads((two / f"result-{r}.json").read_text()) for r in range(2)]
    main = ranks[0]["result"]

    # The loss curve, step by step, and every score
    assert len(main["history"]) == len(one["history"]) == 6
    for ours, theirs in zip(main["history"], one["history"], strict=True):
        for key in ("train_loss", "train_score", "val_score", "test_score", "nonzero_rank"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-5), (ours["step"], key)
    assert main["rank_pattern"] == one["rank_pattern"]
    ranks_left = sum(one["rank_pattern"].values())
    assert 0 < ranks_left < 4 * len(one["rank_pattern"]), "some ranks pruned, not all"

    # The final gates: one process's and rank 0's last checkpoints agree, zeros and all...
    gates_one = load_file(latest_checkpoint(tmp_path / "one") / "adapter.safetensors")
    gates_two = load_file(latest_checkpoint(two / "trial-0") / "adapter.safetensors")
    names = [n for n in gates_one if "sora_gate" in n]
    assert names
    for name in names:
        torch.testing.assert_close(gates_two[name], gates_one[name], atol=1e-6, rtol=0)
        assert torch.equal(gates_two[name] == 0, gates_one[name] == 0), name
    # ... and the two ranks' gates are the same bits
    rank_gates = [torch.load(two / f"gates-{r}.pt") for r in range(2)]
    assert rank_gates[0].keys() == rank_gates[1].keys() and rank_gates[0]
    for name, gate in rank_gates[0].items():
        assert torch.equal(gate, rank_gates[1][name]), name

    # The exported adapter: the same modules and ranks, the same tensors within 1e-5 (the
    # workers sum their gradients in another order; measured: 9.1e-6 at most, sharded or not)
    adapters = [folder / "adapter" for folder in (tmp_path / "one", two / "trial-0")]
    configs = [json.loads((a / "adapter_config.json").read_text()) for a in adapters]
    assert configs[0]["rank_pattern"] == configs[1]["rank_pattern"]
    exported = [load_file(a / "adapter_model.safetensors") for a in adapters]
    assert exported[0].keys() == exported[1].keys() and exported[0]
    for name, tensor in exported[0].items():
        torch.testing.assert_close(exported[1][name], tensor, atol=1e-5, rtol=0)

    # Both ranks reported every evaluation; rank 0 alone wrote checkpoints
    assert len(ranks[0]["reports"]) == 6 and None not in ranks[0]["reports"]
    assert ranks[1]["reports"] == [None] * 6
    assert not list((two / "trial-1").glob("checkpoint-*"))
    assert not (two / "trial-1" / "metrics.json").exists()
    assert ranks[0]["status"] == ranks[1]["status"] == "finished"

    # Stopped inside an epoch and resumed from rank 0's checkpoint: as if never stopped
    for resumed, uninterrupted in zip(ranks[0]["resumed"], main["history"], strict=True):
        for key in ("train_loss", "val_score", "nonzero_rank", "retained_params"):
            assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-6, abs=1e-9), key


def test_a_base_is_sharded_only_among_workers_and_only_in_floats(parity_trial):
    with pytest.raises(ValueError, match="shard_base needs workers_per_trial > 1"):
        train_trial(parity_trial | {"shard_base": True}, device="cpu")
    with pytest.raises(ValueError, match="shard_base with base_dtype 'nf4'"):
        TrialConfig(shard_base=True, base_dtype="nf4")


def test_a_batch_that_does_not_split_is_refused():
    check_batch_size(8, 2)
    with pytest.raises(ValueError, match="batch_size 6 does not split across workers_per_trial 4"):
        check_batch_size(6, 4)
