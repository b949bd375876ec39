"""Decoders as classifiers: padding with eos, last-token pooling, the trained `score` head,
gradient checkpointing, and a real decoder (SmolLM2-135M, marked slow) trained from the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from sora_tune.config import TrialConfig
from sora_tune.models import PAD_FROM_EOS, build_model, load_tokenizer, use_eos_as_pad
from sora_tune.sora import sora_layers
from sora_tune.train import seed_everything, train_trial
from tests.conftest import MINILM_PATH, word_tokenizer, write_tiny_rte
from tests.sora.test_model import randomise_adapter
from tests.test_bench_scripts import load_script

REPO = Path(__file__).resolve().parents[1]
SEVEN_KINDS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_a_tokenizer_without_pad_pads_with_eos_and_records_it(tiny_decoder_dir):
    tokenizer = load_tokenizer(TrialConfig(task="rte", model=tiny_decoder_dir))
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert getattr(tokenizer, PAD_FROM_EOS) is True
    assert tokenizer.padding_side == "right"
    own = load_tokenizer(TrialConfig(task="rte", model=MINILM_PATH))
    assert own.pad_token == "[PAD]" and getattr(own, PAD_FROM_EOS) is False


def test_a_tokenizer_with_neither_pad_nor_eos_is_refused():
    tokenizer = word_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad nor an end-of-sequence token"):
        use_eos_as_pad(tokenizer)


def test_padded_batches_classify_each_row_as_it_is_alone(tiny_decoder_dir):
    config = TrialConfig(task="rte", model=tiny_decoder_dir)
    tokenizer = load_tokenizer(config)
    seed_everything(0)
    model = build_model(config, total_steps=10, tokenizer=tokenizer).eval()
    randomise_adapter(model, zero_fraction=0.0)
    assert model.config.pad_token_id == tokenizer.eos_token_id
    # The default targets are all seven kinds of block linears; the score head trains in full.
    assert {name.rsplit(".", 1)[1] for name in sora_layers(model)} == SEVEN_KINDS
    assert model.sora_config.modules_to_save == ["score"]
    assert all(p.requires_grad for p in model.score.parameters())

    rows = [("red blue green", "red"), ("happy", "sad cold warm old new dark"), ("old", "new")]
    encoded = [dict(tokenizer(a, b)) for a, b in rows]
    batch = DataCollatorWithPadding(tokenizer)(encoded)
    assert (batch["attention_mask"] == 0).any()  # padded on the right
    with torch.no_grad():
        padded = model(**batch).logits
        alone = torch.cat(
            [model(**{k: torch.tensor([v]) for k, v in e.items()}).logits for e in encoded]
        )
    assert (padded - alone).abs().max().item() <= 1e-5


def test_gradient_checkpointing_gives_the_same_gradients(tiny_decoder_dir):
    tokenizer = load_tokenizer(TrialConfig(task="rte", model=tiny_decoder_dir))
    batch = DataCollatorWithPadding(tokenizer)(
        [dict(tokenizer(text)) for text in ("red blue", "happy sad cold warm")]
    )
    batch["labels"] = torch.tensor([0, 1])
    gradients = []
    for checkpointing in (False, True):
        config = TrialConfig(
            task="rte", model=tiny_decoder_dir, gradient_checkpointing=checkpointing
        )
        seed_everything(0)
        model = build_model(config, total_steps=10, tokenizer=tokenizer).train()
        randomise_adapter(model, zero_fraction=0.0)
        on = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
        assert bool(on) == checkpointing
        model(**batch).loss.backward()
        gradients.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = gradients
    assert plain.keys() == checkpointed.keys()
    assert all(plain[n] is not None for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def tiny_decoder_trial(model: str, folder: Path) -> TrialConfig:
    """A one-epoch RTE trial of the tiny decoder on a tiny RTE folder made in `folder`."""
    return TrialConfig(
        task="rte",
        data_dir=str(write_tiny_rte(folder / "glue")),
        model=model,
        r_max=4,
        epochs=1,
        max_length=16,
        val_size=8,
        train_eval_samples=8,
        cache_dir=str(folder / "cache"),
    )


def test_a_decoder_trial_exports_an_adapter_peft_loads(tiny_decoder_dir, tmp_path):
    config = tiny_decoder_trial(tiny_decoder_dir, tmp_path)
    result = train_trial(config, output_dir=tmp_path / "trial")
    assert result["status"] == "finished"
    adapter = tmp_path / "trial" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert {name.rsplit(".", 1)[1] for name in saved["target_modules"]} == SEVEN_KINDS
    assert saved["modules_to_save"] == ["score"]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_decoder_dir, num_labels=2)
    base.config.pad_token_id = load_tokenizer(config).pad_token_id
    peft_model = PeftModel.from_pretrained(base, adapter)
    assert hasattr(peft_model.base_model.model.score, "modules_to_save")  # the trained head


@pytest.mark.slow
def test_sora_tune_train_on_smollm2_adapts_all_seven_kinds_and_peft_loads_it(smollm2_dir, tmp_path):
    glue = write_tiny_rte(tmp_path / "glue")
    out = tmp_path / "trial"
    command = [
        sys.executable,
        "-m",
        "sora_tune.cli",
        "train",
        "--model",
        smollm2_dir,
        "--task",
        "rte",
        "--data-dir",
        str(glue),
        "--output-dir",
        str(out),
        "--epochs",
        "1",
        "--max-length",
        "32",
        "--val-size",
        "8",
        "--train-eval-samples",
        "8",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    subprocess.run(command, check=True, cwd=tmp_path, timeout=900)
    adapter = out / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    kinds = {name.rsplit(".", 1)[1] for name in saved["target_modules"]}
    assert kinds == SEVEN_KINDS
    assert len(saved["target_modules"]) == 7 * 30  # SmolLM2-135M has 30 blocks
    assert saved["modules_to_save"] == ["score"]

    tokenizer = load_tokenizer(TrialConfig(task="rte", model=smollm2_dir))
    base = AutoModelForSequenceClassification.from_pretrained(smollm2_dir, num_labels=2)
    base.config.pad_token_id = tokenizer.pad_token_id
    batch = tokenizer(["a cat sat", "on the mat today"], padding=True, return_tensors="pt")
    with torch.no_grad():
        plain = base(**batch).logits
        peft_model = PeftModel.from_pretrained(base, adapter).eval()
        adapted = peft_model(**batch).logits
    assert not torch.allclose(adapted, plain)  # the adapter and the trained head are in use


def test_adapter_counts_of_the_published_decoders_follow_the_formula():
    """Σ over blocks of r_max · (in + out) per linear, r_max gates each, a hidden × 2 head."""
    script = load_script("adapter_params")
    for name, c in script.PUBLISHED.items():
        h, inter = c["hidden_size"], c["intermediate_size"]
        head_dim = c.get("head_dim", h // c["num_attention_heads"])
        q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
        shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
        per_block = sum(8 * (n_in + n_out) for n_in, n_out in shapes)
        counts = script.published_counts(name, r_max=8)
        assert counts["modules"] == 7 * c["num_hidden_layers"]
        assert counts["retained_max"] == per_block * c["num_hidden_layers"]
        assert counts["trainable"] == counts["retained_max"] + 8 * counts["modules"] + 2 * h


@pytest.mark.slow
def test_the_published_smollm2_count_is_the_real_models(smollm2_dir):
    script = load_script("adapter_params")
    real = AutoModelForSequenceClassification.from_pretrained(smollm2_dir, num_labels=2)
    assert script.adapter_counts(real) == script.published_counts("SmolLM2-135M")


def test_the_readme_states_the_scripts_counts(capsys):
    load_script("adapter_params").main([])
    table = capsys.readouterr().out.strip()
    assert table in (REPO / "README.md").read_text()


def test_bench_step_runs_on_a_decoder(tiny_decoder_dir, tmp_path):
    output = tmp_path / "step.json"
    argv = ["--model", tiny_decoder_dir, "--methods", "sora,lora", "--rounds", "2", "--steps", "1"]
    argv += ["--batch-size", "2", "--length", "8", "--output", str(output)]
    result = load_script("bench_step").main(argv)
    assert set(result["median_ms"]) == set(result["median_cpu_ms"]) == {"sora", "lora"}
    assert set(result["ratios"]) == set(result["cpu_ratios"]) == {"sora_over_lora"}
    assert json.loads(output.read_text())["samples_cpu_ms"]["sora"]


def test_a_registered_decoder_classifies_a_batch_as_each_row_alone(tiny_decoder_dir, tmp_path):
    """The registered model pads as the trial did (eos, on the right, the model's pad id set), so
    rows of different lengths in one batch get the scores each gets alone."""
    import mlflow
    import pandas as pd

    from sora_tune.registry import register
    from sora_tune.tracking import (
        PAD_FROM_EOS_TAG,
        PAIR_SEPARATOR_TAG,
        create_trial_run,
        tracked_trial,
    )

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    config = tiny_decoder_trial(tiny_decoder_dir, tmp_path)
    run_id = create_trial_run(uri, "decoder")
    result = tracked_trial(config, run_id=run_id, tracking_uri=uri, output_dir=tmp_path / "trial")
    assert result["pad_from_eos"] is True
    tags = mlflow.MlflowClient(uri).get_run(run_id).data.tags
    assert tags[PAD_FROM_EOS_TAG] == "true"
    # The word tokenizer has no pair template: the trial joined each pair with its eos.
    assert result["pair_separator"] == "</s>" and tags[PAIR_SEPARATOR_TAG] == '"</s>"'
    registered = register(
        experiment_name="decoder", name="decoder", tracking_uri=uri, output_dir=tmp_path
    )
    model = mlflow.pyfunc.load_model(registered.model_uri)
    rows = pd.DataFrame(
        {
            "sentence1": ["red blue", "small large quick slow happy", "sad"],
            "sentence2": ["red blue", "bright", "sad sad sad red blue green"],
        }
    )
    together = model.predict(rows)
    alone = pd.concat([model.predict(rows.iloc[[i]]) for i in range(len(rows))])
    columns = [c for c in together.columns if c.startswith("prob_")]
    assert together[columns].to_numpy() == pytest.approx(alone[columns].to_numpy(), abs=1e-5)
    # Serving joins a pair as the trial did.
    assert model.metadata.metadata["pair_separator"] == "</s>"
    served = model.unwrap_python_model()
    with torch.inference_mode():
        joined = served.tokenizer("red blue</s>red blue", return_tensors="pt")
        expected = served.model(**joined).logits.double().softmax(-1)[0].numpy()
    assert together[columns].to_numpy()[0] == pytest.approx(expected, abs=1e-5)
