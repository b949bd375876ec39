"""The SoRA linear layer: a frozen linear plus a gated low-rank update.

    y = W0 x + s · W_u (g ⊙ (W_d dropout(x))),   s = alpha / r_max

W_d is `sora_A` (r × in, Kaiming-uniform), W_u is `sora_B` (out × r, zeros) and g is `sora_gate` (r).
Every trainable tensor starts with `sora_`, so freezing, optimizer groups and export are name filters.

The base layer is any linear (`base_kind`): an `nn.Linear`, GPT-2's `Conv1D` (its weight stored
transposed, in × out: PEFT's `fan_in_fan_out`), a bitsandbytes `Linear4bit` (NF4/FP4) or
`Linear8bitLt` (LLM.int8), or an `nn.Linear` whose weight is a torchao tensor subclass. The adapter
only calls it, so one layer serves them all; its sizes come from the layer's features, not its
(packed) weight, and it is fp32 whatever the base stores, as PEFT's `autocast_adapter_dtype` keeps
LoRA's: a bf16 or 4-bit base trains fp32 adapters and gates. Only `merge` differs: a quantised
weight cannot take ΔW without being dequantised, so it is refused.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import GateInit

PREFIX = "sora_"
ADAPTER_DTYPE = torch.float32  # the adapter's own dtype, whatever the base's (see the docstring)
# What `base_kind` calls each kind of base layer; the quantised ones cannot be merged into.
QUANTISED_KINDS = ("bitsandbytes 4-bit", "bitsandbytes 8-bit", "torchao")


def soft_threshold(x: torch.Tensor, xi: float) -> torch.Tensor:
    """T_ξ(x) = sign(x) · max(|x| − ξ, 0): zero where |x| ≤ ξ, shrink the rest towards 0 by ξ.

    This is the proximal operator of ξ‖·‖₁.
    """
    return torch.sign(x) * torch.clamp(x.abs() - xi, min=0.0)


def base_kind(layer: nn.Module) -> str | None:
    """What kind of linear `layer` is: `linear`, `conv1d`, one of `QUANTISED_KINDS`, or `None`
    (no linear an adapter can wrap). bitsandbytes and torchao are optional: a layer of theirs
    exists only once they are imported, so they are looked up, never imported, here."""
    bnb = sys.modules.get("bitsandbytes.nn")
    if bnb is not None and isinstance(layer, bnb.Linear4bit):
        return "bitsandbytes 4-bit"
    if bnb is not None and isinstance(layer, bnb.Linear8bitLt):
        return "bitsandbytes 8-bit"
    if isinstance(layer, Conv1D):
        return "conv1d"
    if not isinstance(layer, nn.Linear):
        return None
    # torchao quantises a plain nn.Linear by swapping its weight for a tensor subclass, whose
    # class names change between releases (AffineQuantizedTensor, Int8Tensor, ...): its base.
    torchao = sys.modules.get("torchao.utils")
    if torchao is not None and isinstance(layer.weight, torchao.TorchAOBaseTensor):
        return "torchao"
    return "linear"


def base_features(layer: nn.Module) -> tuple[int, int]:
    """`(in_features, out_features)` of a linear of any `base_kind`: a packed 4-bit weight's
    shape says nothing of them."""
    if isinstance(layer, Conv1D):
        return layer.nx, layer.nf
    return layer.in_features, layer.out_features


class SoRALinear(nn.Module):
    """A frozen linear of any `base_kind` (`base_layer`) with a gated low-rank adapter beside it.

    Raises:
        TypeError: `base_layer` is not a linear layer.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r_max: int,
        alpha: float,
        dropout: float = 0.0,
        gate_init: GateInit = "normal",
        trainable_gate: bool = True,
    ) -> None:
        super().__init__()
        self.kind = base_kind(base_layer)
        if self.kind is None:
            raise TypeError(f"SoRALinear wraps a linear layer, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_features(base_layer)
        self.fan_in_fan_out = self.kind == "conv1d"  # weight is in × out
        self.scaling = alpha / r_max
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        like = {"dtype": ADAPTER_DTYPE, "device": base_layer.weight.device}
        self.sora_A = nn.Parameter(torch.empty(r_max, self.in_features, **like))
        self.sora_B = nn.Parameter(torch.zeros(self.out_features, r_max, **like))
        nn.init.kaiming_uniform_(
            self.sora_A, a=math.sqrt(5)
        )  # as LoRA: B = 0 makes ΔW = 0 at start
        init = torch.randn if gate_init == "normal" else torch.ones
        self.sora_gate = nn.Parameter(init(r_max, **like))
        self.sora_gate.requires_grad_(trainable_gate)
        self.merged = False

    @property
    def rank(self) -> int:
        return self.sora_A.shape[0]

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · W_u diag(g) W_d (out × in), the dense update that `merge` adds to the base
        weight (transposed for a `Conv1D`)."""
        return (self.sora_B * (self.scaling * self.sora_gate)) @ self.sora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged or self.rank == 0:
            return result
        # In the adapter's dtype, back in the base's: a bf16 base's input meets fp32 weights.
        down = F.linear(self.dropout(x).to(self.sora_A.dtype), self.sora_A)
        # s · g scales the r-wide code, not the out-wide update: one multiply of tokens × r
        # instead of a second one of tokens × out (PEFT's LoRA pays that one), same product.
        update = F.linear(down * (self.sora_gate * self.scaling), self.sora_B)
        return result + update.to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Add ΔW into the base weight, so inference costs one matmul.

        Raises:
            TypeError: the base weight is quantised (dequantising it is not a merge).
            RuntimeError: already merged.
        """
        if self.kind in QUANTISED_KINDS:
            raise TypeError(
                f"cannot merge into a {self.kind} base layer without dequantising it; "
                "serve the adapter beside the base (export_peft) instead"
            )
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
