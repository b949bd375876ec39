"""What a trial asks of the cluster: its CPUs and its GPU share (`trial_resources`).

With `gpus_per_trial: auto` a trial's GPU share comes from its own memory estimate
(`sora_tune.memory.estimate_memory` on `cuda`), rounded up to the next 1/8 of the smallest GPU's
memory, so that Ray's logical shares match physical memory: two trials Ray puts on one GPU fit
in it side by side. A space holding a trial that fits no GPU is refused before the search
starts (`check_trials_fit`), naming the settings that would make it fit. Each trial process is
then capped at its share on a GPU (`GpuMemoryPlan`, applied by `tune.trial`).

A trial of several workers (`workers_per_trial` N > 1) is N processes, each given a share the
same way: from the estimate of one worker (`estimate_memory(workers=N)`: its 1/N of every
batch, the whole base and adapter, and the gradients' all-reduce), which is also what the
refusal checks and what each worker's cap is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypedDict

from mlflow import MlflowClient

from ..config import TrialConfig
from ..memory import MEMORY_FIELDS, MemoryEstimate, format_bytes
from .config import AUTO
from .space import SearchSpace

# Shares in steps of 1/8 of a GPU (issue #25): fine enough to pack six small trials on one GPU,
# coarse enough that an estimate's ±15% rarely moves a trial into the next step.
SHARE_STEPS = 8
# Settings where a larger value needs more memory: a space's worst trial takes the largest.
LARGER_NEEDS_MORE = ("r_max", "batch_size", "max_length")
# What the refusal tries, one change at a time, on the trial that does not fit.
SMALLER_BASES = ("bf16", "int8", "nf4")
SMALLEST_BATCH, SMALLEST_LENGTH = 1, 32


@functools.lru_cache(maxsize=256)
def _estimate(settings: str, workers: int) -> MemoryEstimate:
    from ..memory import estimate_memory  # torch: only when a trial is sized

    config = TrialConfig.from_dict(json.loads(settings))
    return estimate_memory(config, device="cuda", workers=workers)


def gpu_estimate(config: TrialConfig, workers: int = 1) -> MemoryEstimate:
    """The memory on a GPU of the trial's process (one of its `workers`), from the settings an
    estimate reads (`MEMORY_FIELDS`), so trials that differ only in, say, their learning rate
    are estimated once."""
    settings = {name: getattr(config, name) for name in MEMORY_FIELDS}
    return _estimate(json.dumps(settings, sort_keys=True), workers)


def gpu_share(estimate_bytes: int, gpu_bytes: int) -> float:
    """The GPU share of a trial that needs `estimate_bytes`: the next multiple of 1/8 of
    `gpu_bytes`, more than 1 when it fits no such GPU."""
    return math.ceil(estimate_bytes / gpu_bytes * SHARE_STEPS) / SHARE_STEPS


class GpuRequest(TypedDict):
    """How a search gives its trials GPUs: `gpus_per_trial` (a share or `auto`) for each of a
    trial's `workers` (`workers_per_trial`), and the smallest GPU's memory (`None`: a numeric
    share of whichever GPU the trial gets)."""

    gpus_per_trial: float | str
    gpu_bytes: int | None
    workers: int


def trial_gpus(config: TrialConfig, gpus: GpuRequest) -> float:
    """The GPU share of each process of the trial of `config`: `gpus_per_trial` itself, or with
    `auto` the share its estimate (one worker's, of several) needs of `gpu_bytes`."""
    if gpus["gpus_per_trial"] != AUTO:
        return float(gpus["gpus_per_trial"])
    if gpus["gpu_bytes"] is None:
        raise ValueError("gpus_per_trial auto needs the GPU memory (--gpu-memory)")
    return gpu_share(gpu_estimate(config, gpus["workers"]).total_bytes, gpus["gpu_bytes"])


def largest_trial_gpus(space: SearchSpace, gpus: GpuRequest) -> float:
    """The largest GPU share a process of the trials of `space` takes (`worst_trials`)."""
    return max(trial_gpus(config, gpus) for config in worst_trials(space))


def trial_resources(params: dict[str, Any], *, cpus: float, gpus: GpuRequest | None):
    """Ray Tune's resource request for the one-process trial of `params` (`tune.with_resources`
    calls it with each trial's settings); `gpus`: `None` for none."""
    from ray import tune

    share = trial_gpus(TrialConfig.from_dict(params), gpus) if gpus is not None else 0.0
    return tune.PlacementGroupFactory([{"CPU": cpus} | ({"GPU": share} if share else {})])


class OutOfGpuMemory(RuntimeError):
    """A trial ran out of its GPU memory cap."""


@dataclass(frozen=True)
class GpuMemoryPlan:
    """The GPU memory of a trial's process (of each worker, for a trial of several): its share,
    its estimate and, on a GPU, its cap.

    Logged to the trial's run: `gpu_share` and `gpu_memory_cap` (bytes) as params, and the
    metrics `gpu_memory_estimated` (the estimate's total, at step 0) and `gpu_memory_peak`
    (`torch.cuda.max_memory_allocated` over the trial, at its last evaluation). The peak counts
    tensors only; the estimate's tensors' part (`MemoryEstimate.tensor_bytes`, logged as
    `gpu_memory_estimated_tensors`) is what the peak is compared with.
    """

    share: float
    estimate: MemoryEstimate
    device: str
    cap_bytes: int | None  # None on the CPU

    def log(self, client: MlflowClient, run_id: str) -> None:
        client.log_param(run_id, "gpu_share", self.share)
        if self.cap_bytes is not None:
            client.log_param(run_id, "gpu_memory_cap", self.cap_bytes)
        if not client.get_metric_history(run_id, "gpu_memory_estimated"):  # a retried trial
            client.log_metric(run_id, "gpu_memory_estimated", self.estimate.total_bytes, step=0)
            client.log_metric(
                run_id, "gpu_memory_estimated_tensors", self.estimate.tensor_bytes, step=0
            )

    @contextlib.contextmanager
    def capped(self) -> Iterator[None]:
        """On a GPU: allocations capped at `cap_bytes` (`set_per_process_memory_fraction`,
        whose overrun raises `OutOfMemoryError`) and the peak counted from zero; running out
        raises `OutOfGpuMemory` naming the estimate and the cap. The cache is emptied after,
        so the process's next trial (Ray reuses it) and the GPU's neighbours get the memory
        back."""
        if self.cap_bytes is None:
            yield
            return
        import torch

        device = torch.device(self.device)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, self.cap_bytes / total), device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            yield
        except torch.cuda.OutOfMemoryError as err:
            raise OutOfGpuMemory(
                f"out of GPU memory: estimated {format_bytes(self.estimate.total_bytes)}, "
                f"cap {format_bytes(self.cap_bytes)}"
            ) from err
        finally:
            torch.cuda.empty_cache()

    def log_peak(self, client: MlflowClient, run_id: str, step: int) -> None:
        if self.cap_bytes is None:
            return
        import torch

        peak = torch.cuda.max_memory_allocated(torch.device(self.device))
        client.log_metric(run_id, "gpu_memory_peak", peak, step=step)


def gpu_memory_plan(config: TrialConfig, gpus: GpuRequest, device: str) -> GpuMemoryPlan | None:
    """The GPU memory plan of a process (a trial, or one of its workers) of a trial of `config`
    that the search `gpus` sized and Ray put on `device` (`None`: a search without GPUs)."""
    share = trial_gpus(config, gpus)
    if not share:
        return None
    cap = None
    if device.startswith("cuda"):
        import torch

        gpu_bytes = gpus["gpu_bytes"] or torch.cuda.get_device_properties(device).total_memory
        cap = int(share * gpu_bytes)
    return GpuMemoryPlan(share, gpu_estimate(config, gpus["workers"]), device, cap)


def worst_trials(space: SearchSpace) -> list[TrialConfig]:
    """The trials of `space` that need the most memory: every combination of the choices of
    the settings an estimate reads, with r_max, batch_size and max_length at their largest."""
    base = space.representative() | {name: space.largest(name) for name in LARGER_NEEDS_MORE}
    chosen = [
        name
        for name in MEMORY_FIELDS
        if name not in LARGER_NEEDS_MORE and len(space.values(name)) > 1
    ]
    combinations = itertools.product(*(space.values(name) for name in chosen))
    return [
        TrialConfig.from_dict(base | dict(zip(chosen, values, strict=True)))
        for values in combinations
    ]


def check_trials_fit(space: SearchSpace, budget_bytes: int, budget: str, workers: int = 1) -> int:
    """Refuse a space with a trial whose estimate (of one of its `workers`) is more than
    `budget_bytes` (described as `budget`, e.g. "the 24.00 GiB of the smallest GPU"); return
    the largest estimate.

    Raises:
        ValueError: naming the trial's settings, its estimate, the budget and the changes that
            would make it fit.
    """
    largest = 0
    for config in worst_trials(space):
        estimate = gpu_estimate(config, workers)
        largest = max(largest, estimate.total_bytes)
        if estimate.total_bytes <= budget_bytes:
            continue
        settings = ", ".join(
            f"{name} {getattr(config, name)}"
            for name in MEMORY_FIELDS
            if name not in ("model", "target_modules", "modules_to_save")
        )
        each = f" for each of its {workers} workers" if workers > 1 else ""
        raise ValueError(
            f"a trial of this space ({settings}) needs an estimated "
            f"{format_bytes(estimate.total_bytes)} of GPU memory{each} (sora-tune estimate), "
            f"more than {budget}: {_what_fits(config, estimate.base_dtype, budget_bytes, workers)}"
        )
    return largest


def _what_fits(config: TrialConfig, base_dtype: str, gpu_bytes: int, workers: int) -> str:
    """The single changes that make `config` (its base stored in `base_dtype`; one of `workers`)
    fit `gpu_bytes`, each with its estimate. A batch size stays a multiple of the workers."""
    size = {"fp32": -1, "fp16": 0} | {dtype: i for i, dtype in enumerate(SMALLER_BASES)}
    changes: list[dict[str, Any]] = [
        {"base_dtype": dtype} for dtype in SMALLER_BASES if size[dtype] > size[base_dtype]
    ]
    if not config.gradient_checkpointing:
        changes.append({"gradient_checkpointing": True})
    changes += [
        change
        for change in _halvings(config, "batch_size", SMALLEST_BATCH)
        if change["batch_size"] % workers == 0
    ]
    changes += _halvings(config, "max_length", SMALLEST_LENGTH)
    fits: dict[str, str] = {}  # by setting: its first (mildest) change that fits
    for change in changes:
        name, value = next(iter(change.items()))
        if name in fits:
            continue
        total = gpu_estimate(dataclasses.replace(config, **change), workers).total_bytes
        if total <= gpu_bytes:
            fits[name] = f"{name} {value} ({format_bytes(total)})"
    if not fits:
        return (
            "no single change of base_dtype, gradient_checkpointing, batch_size or max_length "
            "makes it fit; combine them, or use a larger GPU"
        )
    return "it would fit with " + ", or ".join(fits.values())


def _halvings(config: TrialConfig, name: str, smallest: int) -> list[dict[str, int]]:
    """`name` halved, and halved again, down to `smallest`."""
    values, value = [], getattr(config, name) // 2
    while value >= smallest:
        values.append({name: value})
        value //= 2
    return values


def cluster_gpu_bytes(timeout_s: float = 120) -> int:
    """The memory of the smallest GPU of the cluster: a Ray task on each GPU node holds one of
    its GPUs for a moment and asks torch. Ray lists GPUs as counts, not memory.

    Raises:
        ValueError: the cluster has no GPU, a node's GPUs are not visible to torch, or they did
            not answer within `timeout_s` (busy): each says to give `--gpu-memory`.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) >= 1]
    if not nodes:
        raise ValueError(
            "gpus_per_trial auto sizes trials to GPU memory, and the Ray cluster has no GPU"
        )

    @ray.remote(num_gpus=1, num_cpus=0)
    def total_memory() -> int | None:
        import torch

        return (
            torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
        )

    asks = [
        total_memory.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote()
        for node in nodes
    ]
    try:
        sizes = ray.get(asks, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as err:
        raise ValueError(
            f"gpus_per_trial auto: the cluster's GPUs did not say their memory within "
            f"{timeout_s:g} s (busy?): give --gpu-memory, e.g. 24GiB"
        ) from err
    hidden = [
        node["NodeManagerAddress"] for node, size in zip(nodes, sizes, strict=True) if size is None
    ]
    if hidden:
        raise ValueError(
            f"gpus_per_trial auto: Ray lists GPUs on {', '.join(hidden)}, but torch sees no CUDA "
            "device there (a CPU build of torch, or no driver): fix the node, or give "
            "--gpu-memory to size trials for the GPUs Ray lists"
        )
    return min(sizes)
