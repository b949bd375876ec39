import io
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from sora_tune.sora import ProximalGateOptimizer


def quadratic_loss(gate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((gate - target) ** 2 * torch.arange(1, gate.numel() + 1)).sum()


def test_paper_step_is_the_argmin_of_eq13():
    """g_{t+1} = argmin_g η λ‖g‖₁ + ½‖g − (g_t − η ∇L0(g_t))‖², solved numerically per coordinate."""
    generator = torch.Generator().manual_seed(0)
    gate = torch.randn(64, generator=generator, dtype=torch.float64, requires_grad=True)
    target = torch.randn(64, generator=generator, dtype=torch.float64)
    eta, lam = 0.1, 0.5
    optimizer = ProximalGateOptimizer([gate], eta=eta, lam=lam, mode="paper")
    quadratic_loss(gate, target).backward()
    z = (gate - eta * gate.grad).detach().numpy()
    optimizer.step()

    expected = []
    for z_i in z:
        objective = lambda g, z_i=z_i: eta * lam * abs(g) + 0.5 * (g - z_i) ** 2  # noqa: E731
        expected.append(
            minimize_scalar(
                objective,
                bounds=(-abs(z_i) - 1, abs(z_i) + 1),
                method="bounded",
                options={"xatol": 1e-12},
            ).x
        )
    np.testing.assert_allclose(gate.detach().numpy(), expected, atol=1e-6)
    assert optimizer.xi == pytest.approx(eta * lam)
    assert (gate == 0).any(), "the threshold should zero some coordinates on this data"


def test_official_step_matches_a_hand_computation():
    """AdamW (bias-corrected, no decay) on L0 + λ·mean|g|, then T_ξ; two steps by hand."""
    eta, lam, xi, beta1, beta2, eps = 0.05, 0.2, 0.02, 0.9, 0.999, 1e-8
    gate = torch.tensor([0.5, -0.03, 0.01, -0.8], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0.1, 0.2, -0.3, 0.4], dtype=torch.float64)
    optimizer = ProximalGateOptimizer([gate], eta=eta, lam=lam, xi=xi, mode="official")

    g = gate.detach().clone().numpy()
    weights = np.arange(1, 5)
    m = np.zeros(4)
    v = np.zeros(4)
    for t in (1, 2):
        optimizer.zero_grad()
        loss = quadratic_loss(gate, target) + optimizer.l1_penalty()
        loss.backward()
        optimizer.step()

        grad = weights * (g - target.numpy()) + lam * np.sign(g) / 4
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad**2
        step = eta * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        g = g - step * m / (np.sqrt(v) + eps)
        g = np.sign(g) * np.maximum(np.abs(g) - xi, 0)
        np.testing.assert_allclose(gate.detach().numpy(), g, rtol=0, atol=1e-12)
    assert optimizer.xi == xi


def test_paper_mode_has_no_loss_penalty_and_official_mode_averages_over_all_gates():
    a = torch.tensor([1.0, -1.0], requires_grad=True)
    b = torch.tensor([0.0, 2.0, 0.0, 0.0], requires_grad=True)
    assert ProximalGateOptimizer([a, b], lam=0.3).l1_penalty() == 0.0
    official = ProximalGateOptimizer([a, b], lam=0.3, xi=1e-4, mode="official")
    assert official.l1_penalty().item() == pytest.approx(0.3 * 4.0 / 6)


def test_xi_setter_paper_mode_moves_lambda():
    gate = torch.zeros(3, requires_grad=True)
    optimizer = ProximalGateOptimizer([gate], eta=0.1, lam=0.1)
    optimizer.xi = 5e-3
    assert optimizer.param_groups[0]["lam"] == pytest.approx(0.05)
    assert optimizer.xi == pytest.approx(5e-3)


def test_lr_scheduler_drives_eta():
    gate = torch.zeros(3, requires_grad=True)
    optimizer = ProximalGateOptimizer([gate], eta=0.1, lam=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert optimizer.xi == pytest.approx(0.1 * 0.5 * 0.1)
    del scheduler


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eta": -0.1}, "eta must be"),
        ({"lam": -1.0}, "lam must be"),
        ({"xi": -1e-4, "mode": "official"}, "xi must be"),
        ({"lam": float("nan")}, "lam must be"),
        ({"xi": 1e-4}, "xi is derived"),
        ({"mode": "adam"}, "mode must be"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProximalGateOptimizer([torch.zeros(2, requires_grad=True)], **kwargs)


def test_state_round_trips_with_weights_only_load():
    gate = torch.tensor([0.5, -0.2], requires_grad=True)
    optimizer = ProximalGateOptimizer([gate], eta=0.1, lam=0.1, xi=1e-3, mode="official")
    (gate**2).sum().backward()
    optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    restored = ProximalGateOptimizer([gate], eta=0.1, lam=0.1, xi=1e-3, mode="official")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.state[gate]["step"] == 1
    torch.testing.assert_close(restored.state[gate]["exp_avg"], optimizer.state[gate]["exp_avg"])
