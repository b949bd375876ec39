"""The memory estimate: its parts from the model's configuration, against training steps
measured on this CPU, and the figures of big decoders on paper."""

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from sora_tune.cli import main
from sora_tune.config import TrialConfig
from sora_tune.memory import PUBLISHED_SHAPES, estimate_memory, memory_size
from sora_tune.peak_memory import check_estimates
from tests.conftest import MINILM_PATH, word_tokenizer

GB = 10**9

# Big enough that what the estimate models (weights, activations) outweighs the constants of a
# process; small enough that all sixteen steps are measured in ~30 s on 2 cores.
MEASURED_SIZE = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
MEASURED_TRIAL = dict(batch_size=8, max_length=128, r_max=8)
CPU_BASE_DTYPES = ("fp32", "bf16", "int8", "nf4")


def llama_31(size: str, folder) -> str:
    """Llama-3.1 of `size` (8B, 70B) as a folder holding only its config.json: the estimate reads
    no weights and no tokenizer."""
    LlamaConfig(**PUBLISHED_SHAPES[f"Llama-3.1-{size}"]).save_pretrained(folder)
    return str(folder)


def trials_per_gpu(model: str, base_dtype: str, gpu_bytes: int) -> int:
    config = TrialConfig(
        model=model,
        base_dtype=base_dtype,
        batch_size=8,
        max_length=256,
        gradient_checkpointing=True,
    )
    return estimate_memory(config, device="cuda").trials_per_gpu(gpu_bytes)


def test_llama_31_on_paper(tmp_path):
    eight = llama_31("8B", tmp_path / "8b")
    assert trials_per_gpu(eight, "nf4", 24 * GB) >= 2
    assert trials_per_gpu(eight, "fp32", 24 * GB) == 0
    assert trials_per_gpu(llama_31("70B", tmp_path / "70b"), "nf4", 80 * GB) >= 1


def test_parts_count_what_a_trial_builds(tiny_decoder_dir):
    """The adapter and head rows count exactly what `build_model` trains, and the frozen
    weights what it freezes."""
    from sora_tune.models import build_model

    config = TrialConfig(model=tiny_decoder_dir, r_max=4)
    parts = {part.name: part.bytes for part in estimate_memory(config, device="cpu").parts}
    model = build_model(config, total_steps=1)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert parts["adapter"] + parts["head"] == trained * 16
    assert parts["frozen weights"] == frozen


@pytest.mark.parametrize(
    "text, size",
    [("24GiB", 24 * 2**30), ("80GB", 80 * GB), ("512 MiB", 512 * 2**20), ("1.5gb", 15 * 10**8)],
)
def test_memory_size(text, size):
    assert memory_size(text) == size


@pytest.mark.parametrize("text", ["24", "24XB", "GiB", "-1GB", "0GiB", "24 GiB extra"])
def test_memory_size_refuses(text):
    with pytest.raises(ValueError, match="is not a memory size"):
        memory_size(text)


def test_estimate_command(tiny_decoder_dir, capsys):
    flags = ["estimate", "--model", tiny_decoder_dir, "--base-dtype", "bf16"]
    assert main([*flags, "--batch-size", "4", "--gpu-memory", "1GiB", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    config = TrialConfig(model=tiny_decoder_dir, base_dtype="bf16", batch_size=4)
    estimate = estimate_memory(config, device="cuda")
    assert printed["total_bytes"] == estimate.total_bytes
    assert printed["trials_per_gpu"] == 2**30 // estimate.total_bytes
    assert [part["name"] for part in printed["parts"]][-2:] == ["CUDA context", "allocator slack"]
    assert main([*flags, "--device", "cpu", "--gradient-checkpointing"]) == 0
    table = capsys.readouterr().out
    assert "frozen weights" in table and "activations" in table and "total" in table
    assert "CUDA context" not in table and "trials per GPU" not in table


@pytest.fixture(scope="module")
def measured_models(tmp_path_factory) -> dict[str, str]:
    """A random BERT and Llama of `MEASURED_SIZE`, saved with their tokenizers, and the
    packaged MiniLM (hidden 384, 6 layers, 12 heads)."""
    from transformers import AutoTokenizer

    folders = {}
    torch.manual_seed(0)
    bert = tmp_path_factory.mktemp("bert")
    BertModel(BertConfig(**MEASURED_SIZE, num_attention_heads=4)).save_pretrained(bert)
    AutoTokenizer.from_pretrained(MINILM_PATH).save_pretrained(bert)
    folders["bert"] = str(bert)
    llama = tmp_path_factory.mktemp("llama")
    tokenizer = word_tokenizer()
    LlamaForCausalLM(
        LlamaConfig(
            **MEASURED_SIZE,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=None,
        )
    ).save_pretrained(llama)
    tokenizer.save_pretrained(llama)
    folders["llama"] = str(llama)
    folders["minilm"] = MINILM_PATH  # a real model, kept out of the constants' fit
    return folders


MEASURED_CASES = [
    (family, base_dtype, checkpointing)
    for family in ("bert", "llama", "minilm")
    for base_dtype in CPU_BASE_DTYPES
    for checkpointing in (False, True)
]
# The fast twin of the whole grid: each random model, base_dtype and checkpointing setting once,
# bitsandbytes' 8-bit matmul with checkpointing among them (what it keeps defeats checkpointing).
FAST_CASES = [
    ("bert", "int8", True),
    ("bert", "bf16", False),
    ("llama", "fp32", False),
    ("llama", "nf4", True),
]


def measure(models: dict[str, str], cases: list[tuple]) -> dict[tuple, object]:
    """Each case's estimate beside its measured peak, all measured in one fresh process."""
    configs = [
        TrialConfig(
            model=models[family],
            base_dtype=base_dtype,
            gradient_checkpointing=checkpointing,
            **MEASURED_TRIAL,
        )
        for family, base_dtype, checkpointing in cases
    ]
    return dict(zip(cases, check_estimates(configs), strict=True))


@pytest.fixture(scope="module")
def fast_checks(measured_models):
    return measure(measured_models, FAST_CASES)


@pytest.fixture(scope="module")
def all_checks(measured_models):
    return measure(measured_models, MEASURED_CASES)


def assert_within_15_percent(check) -> None:
    assert 0.85 <= check.ratio <= 1.15, (
        f"estimated {check.estimated_bytes / 2**20:.1f} MiB, measured "
        f"{check.measured.peak_bytes / 2**20:.1f} MiB"
    )


def case_id(case: tuple) -> str:
    family, base_dtype, checkpointing = case
    return f"{family}-{base_dtype}{'-checkpointing' if checkpointing else ''}"


@pytest.mark.parametrize("case", FAST_CASES, ids=case_id)
def test_estimate_within_15_percent_of_the_measured_peak(fast_checks, case):
    assert_within_15_percent(fast_checks[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", MEASURED_CASES, ids=case_id)
def test_every_cpu_case_within_15_percent_of_the_measured_peak(all_checks, case):
    assert_within_15_percent(all_checks[case])


# The README's "Big models" table.
BIG_MODEL_GPUS_GB = (24, 48, 80, 141)
BIG_MODEL_BASES = ("fp32", "bf16", "int8", "nf4")


def big_models_table(folder) -> str:
    """One trial of each model at each base_dtype, batch 8 × 256 tokens with checkpointing, on a
    GPU: its estimate and how many such trials a 24, 48, 80 and 141 GB GPU holds."""
    lines = [
        "| model | base_dtype | one trial | "
        + " | ".join(f"{gb} GB" for gb in BIG_MODEL_GPUS_GB)
        + " |",
        "|---|---|---:|" + "---:|" * len(BIG_MODEL_GPUS_GB),
    ]
    for name, settings in PUBLISHED_SHAPES.items():
        LlamaConfig(**settings).save_pretrained(folder / name)
        for base_dtype in BIG_MODEL_BASES:
            config = TrialConfig(
                model=str(folder / name), base_dtype=base_dtype, batch_size=8, max_length=256,
                gradient_checkpointing=True,
            )  # fmt: skip
            estimate = estimate_memory(config, device="cuda")
            fits = [str(estimate.trials_per_gpu(gb * GB)) for gb in BIG_MODEL_GPUS_GB]
            lines.append(
                f"| {name} | {base_dtype} | {estimate.total_bytes / GB:.1f} GB | "
                + " | ".join(fits)
                + " |"
            )
    return "\n".join(lines)


def test_the_readme_big_models_table_is_the_estimate(tmp_path):
    table = big_models_table(tmp_path)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert table in readme, f"README's Big models table is stale; it is now:\n{table}"


@pytest.fixture(scope="module")
def smollm2_checks(smollm2_dir):
    """SmolLM2-135M, a real decoder, at every CPU base_dtype with and without checkpointing."""
    configs = [
        TrialConfig(model=smollm2_dir, base_dtype=base_dtype, gradient_checkpointing=checkpointing,
                    **MEASURED_TRIAL)
        for base_dtype in CPU_BASE_DTYPES
        for checkpointing in (False, True)
    ]  # fmt: skip
    return check_estimates(configs)


@pytest.mark.slow
def test_smollm2_estimates_within_15_percent_and_nf4_frozen_at_most_035(smollm2_checks):
    for check in smollm2_checks:
        assert_within_15_percent(check)
    frozen = {c.config.base_dtype: c.measured.frozen_bytes for c in smollm2_checks}
    assert frozen["nf4"] <= 0.35 * frozen["fp32"]  # transformers' own NF4 load: 0.31×
