import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sora_tune.sora import SoRALinear, soft_threshold


def make_layer(r_max=4, alpha=8.0, **kwargs) -> SoRALinear:
    torch.manual_seed(0)
    layer = SoRALinear(nn.Linear(6, 5), r_max=r_max, alpha=alpha, **kwargs)
    nn.init.normal_(layer.sora_B)  # B starts at zero; make the update visible
    return layer


@pytest.mark.parametrize(
    "value, xi, expected",
    [
        (0.5, 0.1, 0.4),
        (-0.5, 0.1, -0.4),
        (0.1, 0.1, 0.0),  # |x| = ξ is zeroed
        (-0.1, 0.1, 0.0),
        (0.15, 0.1, 0.05),  # the authors' code zeroes this one (|x| < 2ξ); the prox does not
        (0.0, 0.1, 0.0),
        (0.3, 0.0, 0.3),
    ],
)
def test_soft_threshold_values(value, xi, expected):
    result = soft_threshold(torch.tensor([value], dtype=torch.float64), xi)
    assert result.item() == pytest.approx(expected, abs=1e-15)


def test_base_layer_is_frozen_and_adapter_is_named_with_prefix():
    layer = make_layer()
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"sora_A", "sora_B", "sora_gate"}
    assert layer.sora_A.shape == (4, 6) and layer.sora_B.shape == (5, 4)
    assert layer.sora_gate.shape == (4,)


def test_new_layer_starts_as_the_base_layer():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = SoRALinear(base, r_max=4, alpha=4.0)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)


def test_forward_is_the_gated_low_rank_formula():
    layer = make_layer()
    x = torch.randn(2, 3, 6)
    s = 8.0 / 4
    expected = layer.base_layer(x) + s * (
        layer.sora_B @ torch.diag(layer.sora_gate) @ layer.sora_A @ x.unsqueeze(-1)
    ).squeeze(-1)
    torch.testing.assert_close(layer(x), expected)


def test_gate_init_and_frozen_gate():
    ones = make_layer(gate_init="ones", trainable_gate=False)
    assert torch.equal(ones.sora_gate, torch.ones(4))
    assert not ones.sora_gate.requires_grad


def test_merge_unmerge_round_trip():
    layer = make_layer()
    x = torch.randn(3, 6)
    before = layer(x)
    weight = layer.base_layer.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer(x), before)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, weight)
    torch.testing.assert_close(layer(x), before)


def test_prune_drops_zero_gates_and_keeps_the_output():
    layer = make_layer(r_max=4)
    with torch.no_grad():
        layer.sora_gate.copy_(torch.tensor([0.0, 0.7, 0.0, -1.3]))
    x = torch.randn(3, 6)
    before = layer(x)
    assert layer.prune_() == 2
    assert layer.sora_A.shape == (2, 6) and layer.sora_B.shape == (5, 2)
    assert layer.scaling == 1.0 and torch.equal(layer.sora_gate, torch.ones(2))
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-6)


def test_prune_to_rank_zero():
    layer = make_layer()
    with torch.no_grad():
        layer.sora_gate.zero_()
    x = torch.randn(3, 6)
    assert layer.prune_() == 0
    torch.testing.assert_close(layer(x), layer.base_layer(x))


# Every kind of base layer (`base_kind`), 64 → 32 (NF4 packs blocks of 64), with the float weight
# it computes with: the 4-bit weight unpacked, the 8-bit one scaled back, Conv1D's transposed.
BASE_KINDS = ("linear", "conv1d", "bitsandbytes 4-bit", "bitsandbytes 8-bit", "torchao")


def base_layer_of(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A base layer of `kind` made from a seeded `nn.Linear(64, 32)`, and its weight (out × in)
    as it computes with it."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    if kind == "linear":
        return linear, linear.weight.detach()
    if kind == "conv1d":
        conv = Conv1D(32, 64)
        conv.load_state_dict({"weight": linear.weight.T, "bias": linear.bias})
        return conv, conv.weight.detach().T
    if kind == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(linear, Int8WeightOnlyConfig())
        return linear, linear.weight.dequantize()
    import bitsandbytes as bnb

    if kind == "bitsandbytes 4-bit":
        layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
        layer.load_state_dict(linear.state_dict())
        layer = layer.to("cpu")  # quantises
        return layer, bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    layer = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
    layer.load_state_dict(linear.state_dict())
    layer = layer.to("cpu")  # quantises: int8 rows and their absolute maxima
    return layer, layer.weight.data.float() * layer.weight.SCB[:, None] / 127


def sora_on(base: nn.Module) -> SoRALinear:
    layer = SoRALinear(base, r_max=4, alpha=8.0)
    torch.manual_seed(1)
    nn.init.normal_(layer.sora_B)  # B starts at zero; make the update visible
    return layer


@pytest.mark.parametrize("kind", BASE_KINDS)
def test_sora_on_any_linear_computes_as_on_its_float_weight(kind):
    """Sizes from the layer's features (not a packed weight's shape), an fp32 adapter, and the
    output of SoRA on the float weight the base computes with. LLM.int8 also quantises the
    input, by rows to 8 bits: its outputs agree to that rounding."""
    base, weight = base_layer_of(kind)
    layer = sora_on(base)
    assert layer.kind == kind
    assert (layer.in_features, layer.out_features) == (64, 32)
    assert layer.sora_A.shape == (4, 64) and layer.sora_B.shape == (32, 4)
    assert {p.dtype for n, p in layer.named_parameters() if "sora_" in n} == {torch.float32}
    on_float = sora_on(nn.Linear(64, 32))
    with torch.no_grad():
        on_float.base_layer.weight.copy_(weight)
        on_float.base_layer.bias.copy_(base.bias)
    on_float.load_state_dict(
        {k: v for k, v in layer.state_dict().items() if "sora_" in k}, strict=False
    )
    x = torch.randn(3, 64)
    tolerance = 2e-2 if kind == "bitsandbytes 8-bit" else 1e-5
    torch.testing.assert_close(layer(x), on_float(x), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("kind", BASE_KINDS)
def test_only_the_adapter_learns_on_any_linear_and_prune_keeps_the_output(kind):
    layer = sora_on(base_layer_of(kind)[0])
    x = torch.randn(3, 64, requires_grad=True)  # as under gradient checkpointing
    layer(x).square().sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    assert set(grads) == {"sora_A", "sora_B", "sora_gate"}
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads.values())
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        layer.sora_gate[::2] = 0.0
        before = layer(x)
        assert layer.prune_() == 2
        torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-5)


def test_an_adapter_on_a_bf16_base_is_fp32_and_answers_in_bf16():
    layer = sora_on(nn.Linear(64, 32).to(torch.bfloat16))
    assert layer.sora_A.dtype == layer.sora_B.dtype == layer.sora_gate.dtype == torch.float32
    assert layer(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["bitsandbytes 4-bit", "bitsandbytes 8-bit", "torchao"])
def test_merging_into_a_quantised_base_is_refused(kind):
    layer = sora_on(base_layer_of(kind)[0])
    with pytest.raises(TypeError, match=f"cannot merge into a {kind} base layer"):
        layer.merge()
    assert not layer.merged


def test_only_a_linear_is_wrapped():
    with pytest.raises(TypeError, match="wraps a linear layer, got Embedding"):
        SoRALinear(nn.Embedding(10, 4), r_max=2, alpha=2.0)
