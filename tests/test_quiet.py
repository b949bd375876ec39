"""Quiet trials and read commands still show the warnings that matter: only the library chatter
known to be harmless (`HARMLESS_WARNINGS`) is silenced, in a trial's environment (a new
interpreter, as Ray starts one) and in a command's own process."""

import os
import subprocess
import sys

import pytest

from sora_tune.quiet import QUIET_ENV

WARN = """
import torch
from torch.optim.lr_scheduler import LambdaLR
{quiet}
with torch.autocast("cpu", dtype=torch.float64):  # not a CPU autocast dtype: torch falls back
    pass
parameter = torch.nn.Parameter(torch.zeros(1))
LambdaLR(torch.optim.SGD([parameter], lr=0.1), lambda step: 1.0).step()  # fp16's skipped step
import warnings
warnings.warn("a deprecation", DeprecationWarning)
"""


@pytest.mark.parametrize("where", ["nowhere", "trial environment", "command process"])
def test_torch_fallback_warnings_show_and_chatter_does_not(where):
    quiet = "from sora_tune.quiet import quiet_this_process; quiet_this_process()"
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}
    if where == "trial environment":
        env |= QUIET_ENV
    code = WARN.format(quiet=quiet if where == "command process" else "")
    done = subprocess.run(
        [sys.executable, "-c", code],  # DeprecationWarning shows by default in __main__
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "In CPU autocast, but the target dtype is not supported" in done.stderr
    chatter = ("lr_scheduler.step()", "a deprecation")
    assert [c in done.stderr for c in chatter] == [where == "nowhere"] * 2, done.stderr


def test_a_search_driver_turns_off_rays_checkpoint_snapshot_warning(monkeypatch, tmp_path):
    """Ray's "consider increasing `CheckpointConfig(num_to_keep)`" warning fires when its
    snapshots come closer than this threshold; Ray documents 0 as off. A user's value wins."""
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    from sora_tune.quiet import SEARCH_DRIVER_ENV, quiet_search_driver

    (variable,) = SEARCH_DRIVER_ENV
    monkeypatch.delenv(variable, raising=False)
    quiet_search_driver()
    manager = _ExperimentCheckpointManager(storage=None, checkpoint_period="auto")
    assert manager._excessive_sync_threshold == 0
    monkeypatch.setenv(variable, "5")
    quiet_search_driver()
    assert os.environ[variable] == "5"


HARMLESS_LOG = """
import logging
import sora_tune
import peft  # imports bitsandbytes and torchao, where installed
cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
cpu_ops.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No 'kernels'")
cpu_ops.warning("another bitsandbytes warning")
"""


def test_known_harmless_log_lines_of_the_libraries_are_hidden_and_no_others():
    done = subprocess.run(
        [sys.executable, "-c", HARMLESS_LOG], capture_output=True, text=True, check=True
    )
    for hidden in ("gemm_4bit_forward", "Enum subclass", "torchao/_C"):
        assert hidden not in done.stderr, done.stderr
    assert "another bitsandbytes warning" in done.stderr
