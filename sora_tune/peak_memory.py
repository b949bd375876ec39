"""A training step's peak memory, measured on the CPU (Linux) or on a GPU: what the estimate
(`sora_tune.memory`) is checked against.

`measure_peaks` runs its trials in a fresh Python process, one after the other. For each:

1. the trial's model and optimizers are built as a trial builds them (`build_model`,
   `configure_optimization`);
2. a warm-up step on a one-row batch pages in the code of the kernels a step runs and creates
   the optimizers' states, so neither counts as the step's memory;
3. the model's own bytes are counted: its parameters and buffers, the quantisation constants
   bitsandbytes keeps beside its weights, and the optimizers' states (`stored_bytes`);
4. the kernel's high-water mark of resident memory is reset (`echo 5 > /proc/self/clear_refs`)
   and one training step (`train.train_step`) runs on `batch_size` rows of `max_length` random
   tokens, every row full, the worst case an estimate at `max_length` covers;
5. the peak is the model's own bytes plus how far the high-water mark (VmHWM) rose above the
   resident memory before the step (VmRSS).

On a GPU, steps 4-5 read the caching allocator instead: its peak of allocated bytes is reset and
the step adds how far `max_memory_allocated` rose above `memory_allocated` before it. Both count
tensors only, so the estimate compared is its tensors' part (without the CUDA context and the
allocator's slack).

glibc's malloc keeps freed memory for reuse, so a step could reuse pages that building the model
freed without raising the resident memory; the process runs with a fixed mmap threshold
(`MALLOC_MMAP_THRESHOLD_`, which also turns glibc's sliding threshold off), so every allocation
above it is a mapping of its own, returned when freed: resident memory then follows the live
tensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from .config import TrialConfig

MMAP_THRESHOLD = 64 * 1024  # bytes; glibc's default starting threshold is 128 KiB
WARM_UP_TOKENS = 8  # the warm-up step's one row


@dataclass(frozen=True)
class MeasuredPeak:
    """One measured training step: the model's own bytes (weights, adapter, head, optimizer
    states), what the step added at its peak (gradients, activations, temporaries), and their
    sum; of the model's bytes, the frozen base's (its weights, buffers and quantisation
    constants); and the median wall time of the steps timed after it (`None`: none timed; the
    measured step's own time includes first-touch page faults)."""

    model_bytes: int
    step_bytes: int
    frozen_bytes: int
    step_seconds: float | None = None

    @property
    def peak_bytes(self) -> int:
        return self.model_bytes + self.step_bytes


def measure_peaks(
    configs: list[TrialConfig], timed_steps: int = 0, device: str = "cpu"
) -> list[MeasuredPeak]:
    """The peak memory of one training step of each trial of `configs` on `device` (`cpu` or
    `cuda`), measured in one fresh Python process, one trial after the other (see the module
    docstring), and the median time of `timed_steps` more steps.

    Raises:
        RuntimeError: the measuring process failed (its stderr's last lines say why).
    """
    payload = json.dumps(
        {
            "configs": [dataclasses.asdict(config) for config in configs],
            "timed_steps": timed_steps,
            "device": device,
        }
    )
    # One thread: memory does not depend on it, and two OpenMP threads competing with other
    # work for this machine's two cores made a step 15 times slower (7.5 s against 0.5 s).
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", __name__],
        input=payload,
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"measuring failed:\n{done.stderr[-3000:]}")
    return [MeasuredPeak(**peak) for peak in json.loads(done.stdout.splitlines()[-1])]


@dataclass(frozen=True)
class EstimateCheck:
    """A trial's estimate (`memory.estimate_memory`; on a GPU its tensors' part) beside its
    measured peak."""

    config: TrialConfig
    estimated_bytes: int
    measured: MeasuredPeak

    @property
    def ratio(self) -> float:
        """Estimated over measured: 1 is exact, above 1 an overestimate."""
        return self.estimated_bytes / self.measured.peak_bytes


def check_estimates(
    configs: list[TrialConfig], timed_steps: int = 0, device: str = "cpu"
) -> list[EstimateCheck]:
    """Each trial's estimate on `device` beside the peak of its training step, measured as
    `measure_peaks` measures (one fresh process for all), and `timed_steps` more steps timed."""
    from .memory import estimate_memory

    peaks = measure_peaks(configs, timed_steps, device)
    return [
        EstimateCheck(config, estimate_memory(config, device=device).tensor_bytes, peak)
        for config, peak in zip(configs, peaks, strict=True)
    ]


def _status_bytes(field: str) -> int:
    """A `kB` field of /proc/self/status (`VmRSS`, `VmHWM`) in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def stored_tensors(model, optimizers) -> list:
    """The tensors `model` and its `optimizers` hold: parameters, buffers, bitsandbytes'
    quantisation constants (a 4-bit weight's `quant_state`, an 8-bit weight's row scales `SCB`)
    and the optimizers' states."""
    import torch

    tensors = [*model.parameters(), *model.buffers()]
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        while state is not None:  # double quantisation nests a second state
            tensors += [t for t in vars(state).values() if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None)
        tensors += [t for t in (getattr(param, "SCB", None),) if t is not None]
    return tensors + optimizer_states(optimizers)


def optimizer_states(optimizers) -> list:
    """The tensors the `optimizers` keep for their parameters (AdamW's moments, …)."""
    import torch

    return [
        tensor
        for optimizer in optimizers
        for state in optimizer.state.values()
        for tensor in state.values()
        if isinstance(tensor, torch.Tensor)
    ]


def stored_bytes(tensors: list) -> int:
    """Bytes of `tensors`, each storage once (tied weights, views)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _measure_here(config: TrialConfig, timed_steps: int, device_type: str) -> MeasuredPeak:
    """One trial's training step, measured in this process (see the module docstring)."""
    import ctypes
    import gc

    import torch

    from .data import get_task
    from .models import build_model, resolve_precision
    from .train import configure_optimization, train_step

    device = torch.device(device_type)
    precision = resolve_precision(config.precision, device)
    task = get_task(config.task)
    model = build_model(config, total_steps=2, task=task, device=device)
    model.train()
    optimization = configure_optimization(
        model, config, steps_per_epoch=2, device=device, precision=precision
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(config.seed)

    def batch(rows: int, tokens: int) -> dict[str, torch.Tensor]:
        shape = (rows, tokens)
        inputs = {
            "input_ids": torch.randint(model.config.vocab_size, shape, generator=generator),
            "attention_mask": torch.ones(shape, dtype=torch.long),
            "labels": torch.randint(task.num_labels, (rows,), generator=generator),
        }
        return {name: tensor.to(device) for name, tensor in inputs.items()}

    def step(inputs: dict[str, torch.Tensor], number: int) -> None:
        loss = train_step(
            model,
            inputs,
            optimization,
            trainable,
            config=config,
            step=number,
            device=device,
            precision=precision,
        )
        if loss is None:
            raise RuntimeError("the measured step's loss is not finite")

    step(batch(1, WARM_UP_TOKENS), 0)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what small allocations freed goes back too
    tensors = stored_tensors(model, optimization.optimizers)
    for tensor in tensors:  # weights mapped from the checkpoint's file are read in now
        tensor.sum()
    model_bytes = stored_bytes(tensors)
    trained = stored_bytes(
        [p for p in model.parameters() if p.requires_grad]
        + optimizer_states(optimization.optimizers)
    )
    full = batch(config.batch_size, config.max_length)  # made before the mark: not the step's
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(full, 1)
        step_bytes = torch.cuda.max_memory_allocated(device) - before
    else:
        before = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current VmRSS (proc(5))
        step(full, 1)
        step_bytes = _status_bytes("VmHWM") - before
    times = []
    for number in range(2, 2 + timed_steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step before has ended: time this one alone
        start = time.perf_counter()
        step(full, number)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return MeasuredPeak(
        model_bytes=model_bytes,
        step_bytes=step_bytes,
        frozen_bytes=model_bytes - trained,
        step_seconds=statistics.median(times) if times else None,
    )


def main() -> None:
    """Measure the trials given on stdin (`{"configs": [settings, ...], "timed_steps": n}`);
    print the peaks as one JSON line."""
    from .quiet import quiet_this_process

    quiet_this_process()
    asked = json.loads(sys.stdin.read())
    configs = [TrialConfig.from_dict(values) for values in asked["configs"]]
    peaks = [
        dataclasses.asdict(_measure_here(c, asked["timed_steps"], asked["device"])) for c in configs
    ]
    print(json.dumps(peaks))


if __name__ == "__main__":
    main()
