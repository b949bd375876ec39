"""Configuration of a SoRA adapter (what to adapt and how), kept apart from the training knobs."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass
from typing import Literal

# Named sets of target modules, after the paper's Table 3 (which parts of the blocks to adapt):
# `all` every linear layer inside the transformer blocks (the default), `attention` the q, k, v and
# output projections, `qkv` and `qk`. `targets.py` finds them in each family's own module names.
PRESETS = ("all", "attention", "qkv", "qk")

GateInit = Literal["normal", "ones"]


@dataclass
class SoRAConfig:
    """What to adapt and how.

    Args:
        r_max: Rank of every adapter before sparsification (the paper's r_max); ≥ 1. Typical: 4-32.
        alpha: Scaling numerator: the low-rank update is multiplied by `alpha / r_max`. Typical: r_max.
        dropout: Dropout on the adapter's input, in [0, 1).
        target_modules: Which linear layers get an adapter: a preset (`PRESETS`: `all`, every linear
            layer inside the transformer blocks; `attention`, `qkv`, `qk`), a regular expression
            that must match a module's full name (PEFT's convention), or a list that matches names
            equal to an entry or ending in `.entry`. See `targets.py`.
        modules_to_save: Modules trained in full and saved with the adapter. `None` means the task
            head: what the task model adds to its backbone, and the backbone's pooler.
        gate_init: `"normal"` draws the gate from N(0, 1) like the authors' code; `"ones"` starts it
            at 1 (the adapter then starts as a plain LoRA).
        trainable_gate: `False` freezes the gate at its initial value. With `gate_init="ones"` this is
            the LoRA baseline in the same layer.
    """

    r_max: int = 8  # rank before pruning; the paper uses 8
    alpha: float = 8.0  # scaling = alpha / r_max; 8 with r_max 8 gives scaling 1
    dropout: float = 0.0  # adapter input dropout, [0, 1)
    target_modules: str | list[str] = "all"  # a preset, a regex or names; all: every block linear
    modules_to_save: list[str] | None = None  # None: the task head and the backbone's pooler
    gate_init: GateInit = "normal"  # "normal" (authors' code) or "ones"
    trainable_gate: bool = True  # False + gate_init "ones" = the LoRA baseline

    def __post_init__(self) -> None:
        if isinstance(self.r_max, bool) or not isinstance(self.r_max, int) or self.r_max < 1:
            raise ValueError(f"r_max must be an integer >= 1, got {self.r_max!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.gate_init not in ("normal", "ones"):
            raise ValueError(f"gate_init must be 'normal' or 'ones', got {self.gate_init!r}")
        if isinstance(self.target_modules, str) and self.target_modules not in PRESETS:
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ValueError(
                    f"target_modules is not a valid regular expression: {self.target_modules!r} ({err})"
                ) from err
        elif not self.target_modules:
            raise ValueError(
                f"target_modules must be a preset ({', '.join(PRESETS)}), a regular expression or "
                f"a non-empty list of names, got {self.target_modules!r}"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.r_max

    def to_dict(self) -> dict:
        return asdict(self)


def lora_config(config: SoRAConfig) -> SoRAConfig:
    """The LoRA baseline of a SoRA config: the same layer with the gate fixed at 1."""
    return dataclasses.replace(config, gate_init="ones", trainable_gate=False)
