"""The model room: a backbone loaded at every base_dtype on tiny random BERT and Llama models.
The adapter and the head are fp32 and alone trained, whatever the base stores; the head and the
pooler are never quantised; checkpointing leaves the adapter its gradients; pruning keeps the
logits; a one-epoch trial runs on each, and a resumed 4-bit one ends as an uninterrupted one;
stock PEFT serves the export on the same quantised base."""

import contextlib
import dataclasses

import pytest
import torch
from peft import PeftModel
from transformers import DataCollatorWithPadding

from sora_tune.config import TrialConfig
from sora_tune.models import build_model, load_tokenizer, resolve_base_dtype, unquantised_modules
from sora_tune.serving.sora_pyfunc import load_base as serving_base
from sora_tune.sora import export_peft, prune, sora_layers
from sora_tune.sora.layer import base_kind
from sora_tune.train import seed_everything, train_trial
from tests.conftest import stop_after
from tests.sora.test_model import randomise_adapter
from tests.test_decoders import tiny_decoder_trial

BASE_DTYPES = ("auto", "fp32", "bf16", "fp16", "int8", "nf4")
# What the base's linears are on the CPU, by base_dtype: `auto` is fp32 here, and NF4 packs its
# 4-bit weights into fp32 tensors (float storage).
CPU_BASE = {
    "auto": ("linear", torch.float32),
    "fp32": ("linear", torch.float32),
    "bf16": ("linear", torch.bfloat16),
    "fp16": ("linear", torch.float16),
    "int8": ("bitsandbytes 8-bit", torch.int8),
    "nf4": ("bitsandbytes 4-bit", torch.float32),
}


@pytest.fixture(params=["bert", "llama"])
def tiny_backbone(request, tiny_model_dir, tiny_decoder_dir) -> str:
    return {"bert": tiny_model_dir, "llama": tiny_decoder_dir}[request.param]


def tiny_batch(tokenizer) -> dict[str, torch.Tensor]:
    texts = [("red blue green", "red"), ("happy sad cold warm old new", "dark")]
    batch = DataCollatorWithPadding(tokenizer)([dict(tokenizer(a, b)) for a, b in texts])
    return batch | {"labels": torch.tensor([0, 1])}


@pytest.mark.parametrize("native, expected", [(False, "fp16"), (True, "bf16")])
def test_auto_base_dtype_is_bf16_on_a_gpu_with_it_fp16_on_an_older_one_fp32_on_the_cpu(
    native, expected, monkeypatch
):
    assert resolve_base_dtype("auto", torch.device("cpu")) == "fp32"
    assert resolve_base_dtype("nf4", torch.device("cpu")) == "nf4"  # asked for: as asked

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native or including_emulation  # every CUDA GPU emulates bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    assert resolve_base_dtype("auto", torch.device("cuda:0")) == expected


@pytest.mark.parametrize("base_dtype", BASE_DTYPES)
def test_the_base_at_any_dtype_trains_an_fp32_adapter_and_head_alone(tiny_backbone, base_dtype):
    """With non-reentrant checkpointing on, as a big base needs it: the frozen base is stored as
    asked, the head and pooler stay fp32 floats, every gradient is the adapter's or the head's
    and fp32, and pruning keeps the logits."""
    config = TrialConfig(
        task="rte", model=tiny_backbone, base_dtype=base_dtype, gradient_checkpointing=True
    )
    tokenizer = load_tokenizer(config)
    seed_everything(0)
    model = build_model(config, total_steps=10, tokenizer=tokenizer).train()
    randomise_adapter(model, zero_fraction=0.5)
    kind, dtype = CPU_BASE[base_dtype]
    for layer in sora_layers(model).values():
        assert layer.kind == kind and layer.base_layer.weight.dtype == dtype
    heads = model.sora_config.modules_to_save
    assert heads == (["classifier", "bert.pooler"] if hasattr(model, "bert") else ["score"])
    for head in heads:
        assert all(base_kind(m) in (None, "linear") for m in model.get_submodule(head).modules())
    assert any(
        m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")
    )

    batch = tiny_batch(tokenizer)
    model(**batch).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(trainable)
    assert all("sora_" in n or n.startswith(tuple(heads)) for n in trainable)
    assert {p.dtype for p in trainable.values()} == {p.grad.dtype for p in trainable.values()}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert all(p.grad.abs().sum() > 0 for n, p in trainable.items() if "sora_A" in n)

    model.eval()
    del batch["labels"]
    with torch.no_grad():
        before = model(**batch).logits
        assert sum(prune(model).values()) > 0
        torch.testing.assert_close(model(**batch).logits, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("base_dtype", ["int8", "nf4"])
def test_the_adalora_baseline_trains_on_a_quantised_base(tiny_decoder_dir, base_dtype):
    config = TrialConfig(
        task="rte", model=tiny_decoder_dir, base_dtype=base_dtype, method="adalora"
    )
    tokenizer = load_tokenizer(config)
    model = build_model(config, total_steps=10, tokenizer=tokenizer).train()
    model(**tiny_batch(tokenizer)).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or ".score." in n for n in trainable)
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in trainable.values())


@pytest.mark.parametrize("base_dtype", BASE_DTYPES)
def test_a_one_epoch_trial_runs_at_any_base_dtype(tiny_decoder_dir, tmp_path, base_dtype):
    config = dataclasses.replace(
        tiny_decoder_trial(tiny_decoder_dir, tmp_path), base_dtype=base_dtype
    )
    result = train_trial(config, output_dir=tmp_path / "trial")
    assert result["status"] == "finished" and result["epoch"] == 1
    assert result["base_dtype"] == resolve_base_dtype(base_dtype, torch.device("cpu"))


@pytest.mark.parametrize("base_dtype", ["int8", "nf4"])
def test_stock_peft_serves_the_export_on_the_same_quantised_base(
    tiny_backbone, base_dtype, tmp_path
):
    """The base loaded as serving loads it (stock transformers), the export by stock PEFT on
    its own bitsandbytes layers: the logits the trained model gave."""
    config = TrialConfig(task="rte", model=tiny_backbone, base_dtype=base_dtype)
    tokenizer = load_tokenizer(config)
    seed_everything(0)
    model = build_model(config, total_steps=10, tokenizer=tokenizer).eval()
    randomise_adapter(model, zero_fraction=0.5)
    batch = {k: v for k, v in tiny_batch(tokenizer).items() if k != "labels"}
    with torch.no_grad():
        trained = model(**batch).logits
    export_peft(model, tmp_path / "adapter")

    base = serving_base(
        tiny_backbone,
        base_dtype,
        num_labels=2,
        unquantised=unquantised_modules(tiny_backbone, None),
        device=torch.device("cpu"),
    )
    base.config.pad_token_id = tokenizer.pad_token_id
    served = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    lora_kinds = {type(m).__module__ for m in served.modules() if hasattr(m, "lora_A")}
    assert lora_kinds == {"peft.tuners.lora.bnb"}
    with torch.no_grad():
        torch.testing.assert_close(served(**batch).logits, trained, rtol=1e-5, atol=1e-5)


def test_a_resumed_nf4_trial_ends_as_an_uninterrupted_one(tiny_decoder_dir, tmp_path):
    """A checkpoint holds the trainables only: the 4-bit base is loaded and quantised again."""
    config = dataclasses.replace(
        tiny_decoder_trial(tiny_decoder_dir, tmp_path),
        base_dtype="nf4",
        epochs=2,
        max_train_samples=16,
    )
    full = train_trial(config, output_dir=tmp_path / "full")
    stop, report = stop_after(epoch=1)
    with pytest.raises(stop):
        train_trial(config, report=report, output_dir=tmp_path / "resumed")
    resumed = train_trial(config, output_dir=tmp_path / "resumed")
    for key in ("train_loss", "val_score", "retained_params", "nonzero_rank"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-6, abs=1e-9), key
    assert resumed["rank_pattern"] == full["rank_pattern"]
