import json

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from sora_tune import SoRAConfig, add_sora, export_peft, prune, retained_params
from sora_tune.sora import (
    SoRALinear,
    gates_thresholded,
    head_params,
    load_adapter,
    param_groups,
    rank_pattern,
    save_adapter,
    set_merged,
    sora_layers,
)
from tests.conftest import load_minilm, tiny_bert

BERT_LAYER_LINEARS = {
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
}


def randomise_adapter(model: nn.Module, zero_fraction: float = 0.5, seed: int = 0) -> None:
    """Give B non-zero values and zero a share of the gates, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in sora_layers(model).values():
            layer.sora_B.normal_(0, 0.05, generator=generator)
            mask = torch.rand(layer.rank, generator=generator) < zero_fraction
            layer.sora_gate.masked_fill_(mask, 0.0)


def test_default_targets_bert_encoder_linears_only(tiny_model):
    add_sora(tiny_model, SoRAConfig(r_max=4))
    adapted = set(sora_layers(tiny_model))
    expected = {f"bert.encoder.layer.{i}.{name}" for i in range(2) for name in BERT_LAYER_LINEARS}
    assert adapted == expected  # not bert.pooler.dense, not the classifier
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    head = {
        "classifier.weight",
        "classifier.bias",
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
    }
    assert trainable == {f"{m}.sora_{t}" for m in expected for t in ("A", "B", "gate")} | head
    assert tiny_model.sora_config.modules_to_save == ["classifier", "bert.pooler"]


def test_user_list_and_regex_targets(tiny_model):
    add_sora(tiny_model, SoRAConfig(target_modules=["query", "value"]))
    assert {n.rsplit(".", 1)[1] for n in sora_layers(tiny_model)} == {"query", "value"}
    model = add_sora(tiny_bert(), SoRAConfig(target_modules=r".*layer\.1\.intermediate\.dense"))
    assert list(sora_layers(model)) == ["bert.encoder.layer.1.intermediate.dense"]


def test_injection_errors(tiny_model):
    with pytest.raises(ValueError, match="matches no linear layer"):
        add_sora(tiny_bert(), SoRAConfig(target_modules=["nonexistent"]))
    with pytest.raises(ValueError, match="modules_to_save names modules"):
        add_sora(tiny_bert(), SoRAConfig(modules_to_save=["head"]))
    add_sora(tiny_model, SoRAConfig())
    with pytest.raises(RuntimeError, match="already has SoRA layers"):
        add_sora(tiny_model, SoRAConfig())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r_max": 0}, "r_max must be"),
        ({"alpha": 0}, "alpha must be"),
        ({"dropout": 1.0}, "dropout must be"),
        ({"gate_init": "zeros"}, "gate_init must be"),
        ({"target_modules": "("}, "not a valid regular expression"),
        ({"target_modules": []}, "a non-empty list of names, got \\[\\]"),
        ({"target_modules": None}, "must be a preset .*, got None"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SoRAConfig(**kwargs)


def test_param_groups_partition_the_trainable_parameters(tiny_model):
    add_sora(tiny_model, SoRAConfig(r_max=4))
    groups = param_groups(tiny_model)
    assert len(groups["gate"]) == 12 and len(groups["adapter"]) == 24 and len(groups["head"]) == 4
    grouped = {id(p) for ps in groups.values() for p in ps}
    assert grouped == {id(p) for p in tiny_model.parameters() if p.requires_grad}


def test_whole_model_merge_keeps_logits(tiny_model, minilm_batch):
    add_sora(tiny_model, SoRAConfig(r_max=4))
    randomise_adapter(tiny_model, zero_fraction=0.0)
    before = tiny_model(**minilm_batch).logits
    set_merged(tiny_model, True)
    torch.testing.assert_close(tiny_model(**minilm_batch).logits, before, atol=1e-5, rtol=0)
    set_merged(tiny_model, False)
    torch.testing.assert_close(tiny_model(**minilm_batch).logits, before, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def sparse_minilm():
    """The packaged MiniLM with SoRA r_max 8 and about half of its gates zeroed."""
    model = add_sora(load_minilm(), SoRAConfig(r_max=8, alpha=16))
    randomise_adapter(model)
    with torch.no_grad():  # one module loses every rank, one keeps them all
        sora_layers(model)["bert.encoder.layer.0.attention.self.key"].sora_gate.zero_()
        sora_layers(model)["bert.encoder.layer.5.intermediate.dense"].sora_gate.fill_(0.5)
    return model


def test_pruning_is_exact_on_minilm(sparse_minilm, minilm_batch):
    model = sparse_minilm
    expected_pattern = rank_pattern(model)
    expected_params = retained_params(model)
    before = model(**minilm_batch).logits
    pattern = prune(model)
    after = model(**minilm_batch).logits
    assert (after - before).abs().max().item() <= 1e-5
    assert pattern == expected_pattern
    assert pattern["bert.encoder.layer.0.attention.self.key"] == 0
    assert pattern["bert.encoder.layer.5.intermediate.dense"] == 8
    # A rank-0 module is the plain frozen linear again.
    key = model.get_submodule("bert.encoder.layer.0.attention.self.key")
    assert type(key) is nn.Linear and not key.weight.requires_grad
    assert retained_params(model) == expected_params
    # Exact count: FFN modules are 384→1536 and 1536→384, not hidden×2 per rank.
    ffn = sora_layers(model)["bert.encoder.layer.5.intermediate.dense"]
    assert (ffn.in_features, ffn.out_features) == (384, 1536)
    assert head_params(model) == (384 * 2 + 2) + (384 * 384 + 384)  # classifier + pooler


def test_peft_round_trip_and_count_against_safetensors_shapes(
    sparse_minilm, minilm_batch, tmp_path
):
    model = sparse_minilm  # pruned or not: export takes each module's LoRA factors
    ours = model(**minilm_batch).logits
    pattern = export_peft(model, tmp_path / "adapter")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert {"classifier", "bert.pooler"} <= set(config["modules_to_save"])
    assert "bert.encoder.layer.0.attention.self.key" not in config["target_modules"]
    assert all(rank > 0 for rank in pattern.values())

    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    counted = 0
    for name, lora_A in tensors.items():
        if name.endswith("lora_A.weight"):
            lora_B = tensors[name.replace("lora_A", "lora_B")]
            assert lora_A.shape[0] == lora_B.shape[1]
            counted += lora_A.shape[0] * (lora_A.shape[1] + lora_B.shape[0])
    assert counted == retained_params(model)

    peft_model = PeftModel.from_pretrained(load_minilm(seed=1), tmp_path / "adapter").eval()
    theirs = peft_model(**minilm_batch).logits
    assert (theirs - ours).abs().max().item() <= 1e-5


def test_export_of_an_empty_adapter_is_refused(tiny_model, tmp_path):
    add_sora(tiny_model, SoRAConfig(r_max=2))
    with torch.no_grad():
        for layer in sora_layers(tiny_model).values():
            layer.sora_gate.zero_()
    with pytest.raises(RuntimeError, match="every gate is zero"):
        export_peft(tiny_model, tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_save_and_load_adapter_with_safetensors(tiny_model, tmp_path, minilm_batch):
    add_sora(tiny_model, SoRAConfig(r_max=4))
    randomise_adapter(tiny_model)
    path = tmp_path / "adapter.safetensors"
    save_adapter(tiny_model, path)
    with safe_open(str(path), framework="pt") as handle:  # a safetensors file, no pickle
        assert json.loads(handle.metadata()["sora_config"])["r_max"] == 4

    restored = tiny_bert()  # same base weights, a different adapter initialisation
    torch.manual_seed(1)
    add_sora(restored, SoRAConfig(r_max=4))
    query = "bert.encoder.layer.0.attention.self.query"
    assert not torch.equal(
        sora_layers(restored)[query].sora_A, sora_layers(tiny_model)[query].sora_A
    )
    load_adapter(restored, path)
    torch.testing.assert_close(restored(**minilm_batch).logits, tiny_model(**minilm_batch).logits)

    other = add_sora(tiny_bert(), SoRAConfig(r_max=2))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_adapter(other, path)


def test_a_gate_threshold_zeroes_small_gates_until_the_block_ends(tiny_model):
    add_sora(tiny_model, SoRAConfig(r_max=4))
    before = {name: layer.sora_gate.clone() for name, layer in sora_layers(tiny_model).items()}
    kept = retained_params(tiny_model)
    with gates_thresholded(tiny_model, 0.5):
        for name, layer in sora_layers(tiny_model).items():
            small = before[name].abs() <= 0.5
            assert torch.all(layer.sora_gate[small] == 0)
            assert torch.equal(layer.sora_gate[~small], before[name][~small])  # not shrunk
        assert retained_params(tiny_model) < kept
    for name, layer in sora_layers(tiny_model).items():
        assert torch.equal(layer.sora_gate, before[name])
    assert retained_params(tiny_model) == kept


def test_layers_are_soralinear(tiny_model):
    add_sora(tiny_model, SoRAConfig())
    assert all(isinstance(m, SoRALinear) for m in sora_layers(tiny_model).values())
