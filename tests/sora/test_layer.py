import pytest
import torch
from torch import nn

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
