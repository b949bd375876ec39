"""Library chatter kept off a user's terminal: transformers' load reports, Hugging Face and MLflow
progress bars, MLflow's INFO logs, and the library warnings known to be harmless here
(`HARMLESS_WARNINGS`); every other warning shows, such as torch's autocast and device fallbacks.
A search's driver silences Ray's known-harmless checkpoint warning (`SEARCH_DRIVER_ENV`).
A trial gets these settings as its environment; `pareto`, `register` and `predict` apply them to
themselves unless `--debug` is given, so their output is the table, the registered version or the
predictions. A user's own setting wins.

Some libraries log harmless lines as they are imported (peft imports bitsandbytes and torchao when
they are installed), in every process, before a command could act: importing sora_tune filters
those (`HARMLESS_LOGS`) out of their loggers, and nothing else."""

from __future__ import annotations

import logging
import os
import re
import warnings

# (start of the message, category): the warnings a user cannot act on and need not see.
HARMLESS_WARNINGS = (
    # The libraries' deprecations: for their authors, not for a user of sora-tune.
    ("", FutureWarning),
    ("", DeprecationWarning),
    # fp16: the gradient scaler skips the optimizer step of a batch that overflowed (the first
    # ones, while it finds its scale); the learning-rate schedule steps on, as it should.
    ("Detected call of `lr_scheduler.step()` before `optimizer.step()`", UserWarning),
    # A trial of an interrupted search asks Ray whether its session still runs (tune/trial.py).
    ("`get_trial_id` is meant to only be called inside a function", UserWarning),
)

# (logger, start of the message as logged, before its arguments are filled in): log lines a user
# cannot act on, printed while the libraries are imported.
HARMLESS_LOGS = (
    # bitsandbytes on a CPU with AVX-512 bf16 asks the Hub's kernels-community for a faster 4-bit
    # kernel; without the `kernels` package, or offline, it uses its own and says so every time.
    (
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
    ),
    # torchao's CUDA-only kernels, which a CPU build of torch cannot load; sora-tune calls none.
    ("torchao", "Failed to load "),
    # torchao 0.18 registers its enums with torch.compile as torch 2.13 deprecates: for its authors.
    ("torch.utils._pytree", "%s is an Enum subclass and is now natively supported"),
)

QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    # Python's -W syntax, action:message:category; the message is matched from its start.
    "PYTHONWARNINGS": ",".join(
        f"ignore:{message}:{category.__name__}" for message, category in HARMLESS_WARNINGS
    ),
}


# The search's driver (`run_search`): Ray Tune reads these when a search starts.
SEARCH_DRIVER_ENV = {
    # Ray's own switch (0: off) for "Experiment state snapshotting has been triggered multiple
    # times ... consider increasing `CheckpointConfig(num_to_keep)`". A search keeps one
    # checkpoint per trial, so Ray snapshots the experiment after each, which `--resume` needs;
    # only epochs of seconds (tests, the quickstart) trigger it, where a snapshot costs nothing.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}


def quiet_search_driver() -> None:
    """Apply SEARCH_DRIVER_ENV here (a user's own setting wins)."""
    for name, value in SEARCH_DRIVER_ENV.items():
        os.environ.setdefault(name, value)


def quiet_this_process() -> None:
    """Apply QUIET_ENV here, before the libraries are imported (they read it once)."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    # PYTHONWARNINGS is read when an interpreter starts: this one needs the filters themselves.
    if os.environ["PYTHONWARNINGS"] == QUIET_ENV["PYTHONWARNINGS"]:
        for message, category in HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=re.escape(message), category=category)


def hide_harmless_logs() -> None:
    """Filter `HARMLESS_LOGS` out of their loggers (made here if the library is not imported yet);
    every other line of theirs shows."""
    for name, start in HARMLESS_LOGS:
        logging.getLogger(name).addFilter(
            lambda record, start=start: not str(record.msg).startswith(start)
        )
