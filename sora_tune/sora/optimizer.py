"""The proximal-gradient optimizer for SoRA gates.

Two modes, both exact:

- ``paper`` (eq. 10 of Ding et al. 2023): ``g ← T_{η_t·λ}(g − η_t ∇_g L0)``. A plain gradient step
  on the task loss L0, then the prox of λ‖g‖₁, so the threshold ξ = η_t·λ is derived.
- ``official`` (what the authors' code ran for the published numbers): the loss gets the term
  ``λ · mean|g|`` (`l1_penalty`), the gate takes an AdamW step with learning rate η (bias-corrected,
  no weight decay), then ``T_ξ`` with ξ set on its own. Unlike that code, which zeroes every
  ``|g| < 2ξ``, this zeroes exactly ``|g| ≤ ξ`` and shrinks the rest by ξ.

η is the param group's ``lr``, so a ``torch.optim.lr_scheduler`` can drive η_t.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal

import torch

from .layer import soft_threshold

GateMode = Literal["paper", "official"]


class ProximalGateOptimizer(torch.optim.Optimizer):
    """Proximal-gradient optimizer for the SoRA gates (see the module docstring for the modes).

    Args:
        params: The gate tensors (`sora_gate`), or param groups.
        eta: Gate step size η (paper ≈ 0.1 in `paper` mode; the authors' `--sparse_lr` in `official`).
        lam: ℓ1 strength λ (paper 0.1; the authors' `--sparse_lambda`).
        xi: Threshold ξ, `official` mode only (the authors' `--sparse_lambda_2`, paper's "sparsity
            indicator", e.g. 1e-4). In `paper` mode ξ = η_t·λ and passing `xi` is an error.
        mode: `"paper"` or `"official"`.
        betas, eps: AdamW moments, `official` mode only.

    Raises:
        ValueError: a negative or non-finite η, λ or ξ, an unknown mode, or `xi` in `paper` mode.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        *,
        eta: float = 0.1,
        lam: float = 0.1,
        xi: float | None = None,
        mode: GateMode = "paper",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if mode not in ("paper", "official"):
            raise ValueError(f"mode must be 'paper' or 'official', got {mode!r}")
        if mode == "paper" and xi is not None:
            raise ValueError("xi is derived as eta * lam in 'paper' mode; set lam instead")
        for name, value in (("eta", eta), ("lam", lam), ("xi", xi)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        defaults = {"lr": eta, "lam": lam, "xi": xi or 0.0, "betas": betas, "eps": eps}
        super().__init__(params, defaults)
        self.mode = mode

    @property
    def xi(self) -> float:
        """The threshold applied at the next step: η_t·λ (`paper`) or ξ (`official`)."""
        group = self.param_groups[0]
        return group["lr"] * group["lam"] if self.mode == "paper" else group["xi"]

    @xi.setter
    def xi(self, value: float) -> None:
        """Set the threshold; in `paper` mode through λ = ξ / η_t, the only free quantity there."""
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"xi must be a finite number >= 0, got {value!r}")
        for group in self.param_groups:
            if self.mode == "paper":
                group["lam"] = value / group["lr"]
            else:
                group["xi"] = value

    def l1_penalty(self) -> torch.Tensor | float:
        """The term to add to the loss: λ · mean|g| over all gates in `official` mode, 0 in `paper`.

        In `paper` mode the ℓ1 term is handled by the prox step, not by the gradient.
        """
        if self.mode == "paper":
            return 0.0
        gates = [p for group in self.param_groups for p in group["params"]]
        total = sum(p.abs().sum() for p in gates)
        return self.param_groups[0]["lam"] * total / sum(p.numel() for p in gates)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            eta = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self.mode == "paper":
                    p.add_(p.grad, alpha=-eta)
                    threshold = eta * group["lam"]
                else:
                    self._adamw_step(p, eta, group["betas"], group["eps"])
                    threshold = group["xi"]
                p.copy_(soft_threshold(p, threshold))
        return loss

    def _adamw_step(
        self, p: torch.Tensor, lr: float, betas: tuple[float, float], eps: float
    ) -> None:
        """One bias-corrected Adam step without weight decay (gates are ℓ1-, not ℓ2-regularised)."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = betas
        state["step"] += 1
        state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        step_size = lr * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
        denom = state["exp_avg_sq"].sqrt().add_(eps)
        p.addcdiv_(state["exp_avg"], denom, value=-step_size)
