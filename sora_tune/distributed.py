"""A trial's data-parallel workers, as `train.py` sees them: torch.distributed only, no Ray.

One trial may train on N processes (a search's `workers_per_trial`), each with a full copy of the
model and a share of every batch. They stay one trial because they compute what one process
would: the global batch is `batch_size` rows whatever N, each worker's loss is weighted by its
share of the global batch's rows, the gradients are summed across workers before any optimizer
sees them (so AdamW, the clip and the gates' proximal step see the same numbers on every rank),
and the evaluation's predictions are gathered in the one-process order.

`Workers()` is the one-process trial: every method is then the identity, and no collective runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .sora import adapter_params, transformer_blocks


@dataclass(frozen=True)
class Workers:
    """This process's place among the data-parallel workers of one trial.

    Attributes:
        rank: 0 … size - 1; rank 0 writes the trial's files and records.
        size: The number of workers (1: a one-process trial).
    """

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> Workers:
        """The workers of torch.distributed's default process group, or one process without."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        """Whether this process writes the trial's checkpoints, adapter and records."""
        return self.rank == 0

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """`values` summed over the workers, in float64 (on `device`: NCCL reduces GPU tensors)."""
        if self.size == 1:
            return [float(v) for v in values]
        totals = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        return totals.tolist()

    def share(self, loss: torch.Tensor, rows: int) -> tuple[torch.Tensor, float, int]:
        """The global batch's mean loss, this worker's weight and the global batch's rows, from
        this worker's mean `loss` over its `rows` (0: a short last batch left it none).

        Each worker backpropagates its mean loss times its weight, rows / global rows, and the
        gradients are summed: exactly the gradient of the global batch's mean, even when the
        shares differ in size. A single worker gets `loss` itself and the weight 1.
        """
        if self.size == 1:
            return loss, 1.0, rows
        total, all_rows = self.sum([loss.item() * rows, rows], loss.device)
        mean = torch.tensor(total / all_rows, dtype=torch.float64)
        return mean, rows / all_rows, int(all_rows)

    def broadcast(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Give every worker rank 0's values of `params`, as DDP does when it wraps a model: the
        workers build their models from the same seed, and this makes sure they start equal."""
        if self.size == 1:
            return
        for p in params:
            dist.broadcast(p.data, src=0)

    def reduce_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over the workers, in one collective per dtype. A missing
        gradient counts as zeros (a worker with no rows in a short last batch has none)."""
        if self.size == 1:
            return
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
            )
            dist.all_reduce(flat)
            for p, reduced in zip(group, flat.split([p.numel() for p in group]), strict=True):
                p.grad = reduced.view_as(p)

    def shard_base(self, model: nn.Module, device: torch.device) -> None:
        """Shard the frozen base of `model` across the workers with FSDP2 (`fully_shard`): each
        transformer block, then the root (embeddings and whatever else lies outside the blocks).
        A worker keeps 1/size of the base on `device` and gathers one block at a time to compute.

        The adapter, its gates and the head (`adapter_params`) stay out of FSDP, whole and fp32
        on every worker: `reduce_gradients` sums their gradients as without sharding, and
        pruning, export and checkpoints read them as they are. FSDP, which reduces the
        gradients it manages by averaging (torch 2.13 on gloo: FSDP2's gradients were the
        one-process mean's, ratio 1.0000), would undo the per-worker weights of `share` and,
        beside `reduce_gradients`, reduce them twice. The frozen base has no gradients, so FSDP
        here only gathers weights, which it does exactly: the forward is one process's.
        """
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (self.size,))
        kept = set(adapter_params(model).values())
        for name in transformer_blocks(model):
            for block in model.get_submodule(name):
                fully_shard(block, mesh=mesh, ignored_params=kept)
        fully_shard(model, mesh=mesh, ignored_params=kept)

    def gather_batches(self, batches: list[Any]) -> list[Any]:
        """Every worker's evaluation batches, in the order of one process's loader: worker r
        scored batches r, r + size, r + 2·size, … (`batching.shard_loader(whole_batches=True)`)."""
        if self.size == 1:
            return batches
        gathered: list[list[Any]] = [[] for _ in range(self.size)]
        dist.all_gather_object(gathered, batches)
        total = sum(len(part) for part in gathered)
        return [gathered[i % self.size][i // self.size] for i in range(total)]

    def seed(self, seed: int, step: int) -> None:
        """Seed this worker's torch RNG (dropout) for training from optimizer step `step` on:
        from (seed, rank, step), so that ranks draw different masks for their different rows and
        a run resumed at `step` draws what an uninterrupted one did. A single worker keeps the
        stream its checkpoint restores."""
        if self.size == 1:
            return
        state = np.random.SeedSequence([seed, self.rank, step]).generate_state(1)[0]
        torch.manual_seed(int(state))


ONE_PROCESS = Workers()  # a trial in one process: the default everywhere
