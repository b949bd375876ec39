"""The serving rules of a registered model's precision (`sora_pyfunc.serving_precision`) and of
its base's dtype (`serving_base_dtype`); the capability query is stubbed, so the GPU cases run
here too. tests/test_registry.py serves a bf16 trial's and an nf4 trial's models end to end."""

import pytest
import torch

from sora_tune.serving.sora_pyfunc import PRECISION_ENV, serving_base_dtype, serving_precision


@pytest.mark.parametrize(
    "trained, device, capability, asked, served",
    [
        ("bf16", "cpu", None, None, "fp32"),  # slower than fp32 on most CPUs
        ("fp16", "cpu", None, None, "fp32"),
        ("bf16", "cuda:0", (8, 0), None, "bf16"),  # Ampere: native bf16
        ("bf16", "cuda:0", (7, 5), None, "fp32"),  # a T4 only emulates it
        ("fp16", "cuda:0", (7, 0), None, "fp16"),
        ("fp32", "cuda:0", (9, 0), None, "fp32"),
        ("bf16", "cpu", None, "trial", "bf16"),  # the precision of the recorded scores
        ("fp32", "cpu", None, "BF16", "bf16"),
    ],
)
def test_the_serving_precision_rule(trained, device, capability, asked, served, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    if asked is None:
        monkeypatch.delenv(PRECISION_ENV, raising=False)
    else:
        monkeypatch.setenv(PRECISION_ENV, asked)
    assert serving_precision(trained, torch.device(device)) == served


def test_the_precision_asked_at_load_time_overrides_the_environment(monkeypatch):
    monkeypatch.setenv(PRECISION_ENV, "trial")
    assert serving_precision("bf16", torch.device("cpu"), "fp32") == "fp32"
    with pytest.raises(
        ValueError, match="model_config precision must be auto, trial, bf16, fp16, fp32"
    ):
        serving_precision("bf16", torch.device("cpu"), "int8")


def test_an_unknown_serving_precision_is_refused(monkeypatch):
    monkeypatch.setenv(PRECISION_ENV, "int8")
    with pytest.raises(ValueError, match="SORA_TUNE_SERVING_PRECISION must be auto, trial, bf16"):
        serving_precision("fp32", torch.device("cpu"))


@pytest.mark.parametrize(
    "trained, device, capability, asked, served",
    [
        ("nf4", "cpu", None, "trial", "nf4"),  # an adapter trained on a 4-bit base: on one
        ("bf16", "cpu", None, "trial", "bf16"),
        ("nf4", "cpu", None, "FP32", "fp32"),  # asked: `sora-tune predict --base-dtype fp32`
        ("fp32", "cuda:0", None, "int8", "int8"),
        ("nf4", "cpu", None, "auto", "fp32"),  # as a trial here would store it
        ("nf4", "cuda:0", (8, 0), "auto", "bf16"),
        ("nf4", "cuda:0", (7, 5), "auto", "fp16"),
    ],
)
def test_the_serving_base_dtype_rule(trained, device, capability, asked, served, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert serving_base_dtype(trained, torch.device(device), asked) == served


def test_an_unknown_serving_base_dtype_is_refused():
    with pytest.raises(ValueError, match="model_config base_dtype must be trial, auto, fp32"):
        serving_base_dtype("fp32", torch.device("cpu"), "int4")
