"""The SoRA linear layer: a frozen linear plus a gated low-rank update.

    y = W0 x + s · W_u (g ⊙ (W_d dropout(x))),   s = alpha / r_max

W_d is `sora_A` (r × in, Kaiming-uniform), W_u is `sora_B` (out × r, zeros) and g is `sora_gate` (r).
Every trainable tensor starts with `sora_`, so freezing, optimizer groups and export are name filters.
The base layer is an `nn.Linear` or GPT-2's `Conv1D`, whose weight is stored transposed (in × out):
only `merge` sees the difference (PEFT's `fan_in_fan_out`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import GateInit

PREFIX = "sora_"


def soft_threshold(x: torch.Tensor, xi: float) -> torch.Tensor:
    """T_ξ(x) = sign(x) · max(|x| − ξ, 0): zero where |x| ≤ ξ, shrink the rest towards 0 by ξ.

    This is the proximal operator of ξ‖·‖₁.
    """
    return torch.sign(x) * torch.clamp(x.abs() - xi, min=0.0)


class SoRALinear(nn.Module):
    """A frozen `nn.Linear` or `Conv1D` (`base_layer`) with a gated low-rank adapter beside it."""

    def __init__(
        self,
        base_layer: nn.Linear | Conv1D,
        *,
        r_max: int,
        alpha: float,
        dropout: float = 0.0,
        gate_init: GateInit = "normal",
        trainable_gate: bool = True,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        base_layer.weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(False)
        weight = base_layer.weight
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)  # weight is in × out
        self.scaling = alpha / r_max
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.sora_A = nn.Parameter(weight.new_empty(r_max, self.in_features))
        self.sora_B = nn.Parameter(weight.new_zeros(self.out_features, r_max))
        nn.init.kaiming_uniform_(
            self.sora_A, a=math.sqrt(5)
        )  # as LoRA: B = 0 makes ΔW = 0 at start
        init = torch.randn if gate_init == "normal" else torch.ones
        self.sora_gate = nn.Parameter(init(r_max, dtype=weight.dtype, device=weight.device))
        self.sora_gate.requires_grad_(trainable_gate)
        self.merged = False

    @property
    def rank(self) -> int:
        return self.sora_A.shape[0]

    @property
    def in_features(self) -> int:
        return self.base_layer.weight.shape[0 if self.fan_in_fan_out else 1]

    @property
    def out_features(self) -> int:
        return self.base_layer.weight.shape[1 if self.fan_in_fan_out else 0]

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · W_u diag(g) W_d (out × in), the dense update that `merge` adds to the base
        weight (transposed for a `Conv1D`)."""
        return (self.sora_B * (self.scaling * self.sora_gate)) @ self.sora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged or self.rank == 0:
            return result
        down = F.linear(self.dropout(x).to(self.sora_A.dtype), self.sora_A)
        # s · g scales the r-wide code, not the out-wide update: one multiply of tokens × r
        # instead of a second one of tokens × out (PEFT's LoRA pays that one), same product.
        update = F.linear(down * (self.sora_gate * self.scaling), self.sora_B)
        return result + update.to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add ΔW into the base weight, so inference costs one matmul."""
        if self.merged:
            raise RuntimeError("SoRALinear is already merged")
        self.base_layer.weight += self._stored_delta()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("SoRALinear is not merged")
        self.base_layer.weight -= self._stored_delta()
        self.merged = False

    def _stored_delta(self) -> torch.Tensor:
        """ΔW laid out and typed as the base weight is stored."""
        delta = self.delta_weight()
        return (delta.T if self.fan_in_fan_out else delta).to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain-LoRA factors (A, B) with ΔW = B A: zero-gate ranks dropped, s · diag(g) in B."""
        keep = self.sora_gate != 0
        return self.sora_A[keep], self.sora_B[:, keep] * (self.scaling * self.sora_gate[keep])

    @torch.no_grad()
    def prune_(self) -> int:
        """Replace the adapter by its `lora_factors`: a plain LoRA (gate 1, scaling 1) of the
        retained rank with the same output. Returns that rank."""
        if self.merged:
            raise RuntimeError("unmerge before pruning")
        lora_A, lora_B = self.lora_factors()
        self.sora_A = nn.Parameter(lora_A.clone())
        self.sora_B = nn.Parameter(lora_B)
        self.sora_gate = nn.Parameter(self.sora_gate.new_ones(self.rank), requires_grad=False)
        self.scaling = 1.0
        return self.rank

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, scaling={self.scaling:g}"
        )
