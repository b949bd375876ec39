"""Default targets, heads and presets on eleven families, each a tiny random model built here.

For every family: `add_sora` adapts exactly the linear layers inside the transformer blocks and
trains the task head in full, pruning keeps the logits, and the exported adapter loads in stock
PEFT with the same logits.
"""

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

from sora_tune.sora import SoRAConfig, add_sora, export_peft, prune, sora_layers
from sora_tune.sora.layer import SoRALinear
from sora_tune.sora.targets import resolve_targets, task_heads, transformer_blocks
from tests.sora.test_model import randomise_adapter

VOCAB = 128
PAD = 0  # every tiny model pads with id 0; inputs use ids from 3 up

ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
DECODER = ENCODER | dict(num_attention_heads=4, num_key_value_heads=2)
BERT_LINEARS = {
    "attention.self.query": "q",
    "attention.self.key": "k",
    "attention.self.value": "v",
    "attention.output.dense": "o",
    "intermediate.dense": None,
    "output.dense": None,
}
DECODER_LINEARS = {
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": None,
    "mlp.up_proj": None,
    "mlp.down_proj": None,
}

# family: (config settings, block list, {block linear: attention role}, heads)
FAMILIES = {
    "bert": (ENCODER, "bert.encoder.layer", BERT_LINEARS, {"classifier", "bert.pooler"}),
    "roberta": (ENCODER, "roberta.encoder.layer", BERT_LINEARS, {"classifier"}),
    "deberta-v2": (
        ENCODER | dict(relative_attention=True, pos_att_type=["p2c", "c2p"]),
        "deberta.encoder.layer",
        {
            "attention.self.query_proj": "q",
            "attention.self.key_proj": "k",
            "attention.self.value_proj": "v",
            # relative-position projections (share_att_key=False): block linears, no preset's role
            "attention.self.pos_key_proj": None,
            "attention.self.pos_query_proj": None,
            "attention.output.dense": "o",
            "intermediate.dense": None,
            "output.dense": None,
        },
        {"pooler", "classifier"},
    ),
    "distilbert": (
        dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
        "distilbert.transformer.layer",
        {
            "attention.q_lin": "q",
            "attention.k_lin": "k",
            "attention.v_lin": "v",
            "attention.out_lin": "o",
            "ffn.lin1": None,
            "ffn.lin2": None,
        },
        {"pre_classifier", "classifier"},
    ),
    # ELECTRA's `electra.embeddings_project` is a linear layer outside the blocks.
    "electra": (
        ENCODER | dict(embedding_size=16),
        "electra.encoder.layer",
        BERT_LINEARS,
        {"classifier"},
    ),
    "modernbert": (
        ENCODER | dict(eos_token_id=1, bos_token_id=2, cls_token_id=2, sep_token_id=1),
        "model.layers",
        {"attn.Wqkv": "qkv", "attn.Wo": "o", "mlp.Wi": None, "mlp.Wo": None},
        {"head", "classifier"},
    ),
    "llama": (DECODER, "model.layers", DECODER_LINEARS, {"score"}),
    "qwen2": (DECODER, "model.layers", DECODER_LINEARS, {"score"}),
    "mistral": (DECODER, "model.layers", DECODER_LINEARS, {"score"}),
    "gemma": (DECODER | dict(head_dim=8), "model.layers", DECODER_LINEARS, {"score"}),
    "gpt2": (
        dict(n_embd=32, n_layer=2, n_head=2, eos_token_id=1, bos_token_id=1),
        "transformer.h",
        {"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": None, "mlp.c_proj": None},
        {"score"},
    ),
}


def tiny(family: str, seed: int = 0) -> nn.Module:
    """A 2-block random model of the family with a 3-class sequence-classification head."""
    settings = FAMILIES[family][0]
    config = AutoConfig.for_model(
        family, vocab_size=VOCAB, num_labels=3, pad_token_id=PAD, **settings
    )
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config).eval()


def expected_targets(family: str, roles: set | None = None) -> set[str]:
    _, blocks, linears, _ = FAMILIES[family]
    return {
        f"{blocks}.{i}.{name}"
        for i in range(2)
        for name, role in linears.items()
        if roles is None or role in roles
    }


def batch() -> dict[str, torch.Tensor]:
    """Three rows, the last two right-padded with the pad id."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, length in ((1, 6), (2, 4)):
        input_ids[row, length:] = PAD
        attention_mask[row, length:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_are_the_block_linears_and_heads_train_in_full(family):
    model = tiny(family)
    _, blocks, _, heads = FAMILIES[family]
    assert transformer_blocks(model) == [blocks]
    add_sora(model, SoRAConfig(r_max=2))
    assert set(sora_layers(model)) == expected_targets(family)
    assert set(model.sora_config.modules_to_save) == heads
    # Every head is a real module of the model, and the only non-adapter tensors trained.
    modules = dict(model.named_modules())
    assert heads <= set(modules)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    in_heads = {n for n in trainable if any(n.startswith(h + ".") for h in heads)}
    assert trainable - in_heads == {
        f"{m}.sora_{t}" for m in expected_targets(family) for t in ("A", "B", "gate")
    }
    assert in_heads == {f"{h}.{n}" for h in heads for n, _ in modules[h].named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_keeps_the_logits_and_peft_loads_the_export(family, tmp_path):
    model = add_sora(tiny(family), SoRAConfig(r_max=4, alpha=8))
    randomise_adapter(model)
    with torch.no_grad():  # a trained head, so the exported one must be the one loaded
        for head in model.sora_config.modules_to_save:
            for p in model.get_submodule(head).parameters():
                p.add_(0.1)
    inputs = batch()
    with torch.no_grad():
        before = model(**inputs).logits
        prune(model)
        after = model(**inputs).logits
    assert (after - before).abs().max().item() <= 1e-5

    export_peft(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(tiny(family), tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(**inputs).logits
    assert (theirs - before).abs().max().item() <= 1e-5


PRESET_ROLES = {"attention": {"q", "k", "v", "o", "qkv"}, "qkv": {"q", "k", "v", "qkv"}}


@pytest.mark.parametrize("preset", ["attention", "qkv", "qk"])
@pytest.mark.parametrize("family", FAMILIES)
def test_presets_name_each_familys_projections(family, preset):
    model = tiny(family)
    fused = "qkv" in FAMILIES[family][2].values()
    if preset == "qk" and fused:
        with pytest.raises(ValueError, match="one fused layer .* use 'qkv' or 'attention'"):
            resolve_targets(model, preset)
        return
    roles = PRESET_ROLES.get(preset, {"q", "k"})
    assert set(resolve_targets(model, preset)) == expected_targets(family, roles)


def test_blocks_of_a_hybrid_stack_and_a_preset_without_its_role():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(4, 4)

    class OtherBlock(nn.Module):  # a hybrid stack mixes layer classes
        def __init__(self):
            super().__init__()
            self.scan = nn.Sequential(nn.Linear(4, 4), nn.Tanh())

    model = nn.Sequential()
    model.layers = nn.ModuleList([Block(), OtherBlock()])
    model.norms = nn.ModuleList([nn.LayerNorm(4), nn.LayerNorm(4)])  # no linear layers
    model.heads = nn.ModuleList([nn.Linear(4, 2), nn.Linear(4, 2)])  # bare linears, not blocks
    assert transformer_blocks(model) == ["layers"]
    assert resolve_targets(model, "all") == ["layers.0.mix", "layers.1.scan.0"]
    with pytest.raises(ValueError, match="no q projection found in the blocks"):
        resolve_targets(model, "attention")


def test_heads_of_a_bare_backbone_are_its_pooler_only():
    model = tiny("bert").bert
    assert task_heads(model) == ["pooler"]


def test_conv1d_layer_matches_its_linear_twin_and_merges():
    torch.manual_seed(0)
    conv = Conv1D(5, 6)  # 6 in, 5 out, weight stored 6 × 5
    linear = nn.Linear(6, 5)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    layers = []
    for base in (conv, linear):
        torch.manual_seed(1)
        layer = SoRALinear(base, r_max=3, alpha=6.0)
        nn.init.normal_(layer.sora_B)
        layers.append(layer)
    x = torch.randn(2, 4, 6)
    assert (layers[0].in_features, layers[0].out_features) == (6, 5)
    torch.testing.assert_close(layers[0](x), layers[1](x))
    before = layers[0](x)
    layers[0].merge()
    torch.testing.assert_close(layers[0](x), before, atol=1e-6, rtol=0)
    layers[0].unmerge()
    torch.testing.assert_close(conv.weight, linear.weight.T)


def test_a_search_space_searches_the_presets(tmp_path):
    from sora_tune.tune.space import load_search_space

    path = tmp_path / "space.yaml"
    path.write_text(
        "parameters:\n  target_modules: {type: choice, values: [all, attention, qkv, qk]}\n"
    )
    space = load_search_space(path)
    assert space.values("target_modules") == ["all", "attention", "qkv", "qk"]
    path.write_text("parameters:\n  target_modules: {type: choice, values: [all, '(']}\n")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        load_search_space(path)
