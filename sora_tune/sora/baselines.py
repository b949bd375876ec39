"""Baselines in the same harness as SoRA.

- ``lora``: the SoRA layer with the gate fixed at 1 and not trained (`lora_config`).
- ``adalora``: PEFT's AdaLoRA. Its budget allocator must run after every optimizer step;
  `after_optimizer_step` does that for the caller and is a no-op for the other methods.
"""

from __future__ import annotations

import dataclasses

from peft import AdaLoraConfig, PeftModel, get_peft_model
from peft.tuners.adalora import AdaLoraModel
from torch import nn

from .config import ENCODER_LINEARS, SoRAConfig
from .model import resolve_heads


def lora_config(config: SoRAConfig) -> SoRAConfig:
    """The LoRA baseline of a SoRA config: the same layer with the gate fixed at 1."""
    return dataclasses.replace(config, gate_init="ones", trainable_gate=False)


def add_adalora(
    model: nn.Module,
    config: SoRAConfig,
    *,
    total_steps: int,
    target_r: int | None = None,
    orth_reg_weight: float = 0.1,
) -> PeftModel:
    """Wrap the model in PEFT's AdaLoRA at initial rank `config.r_max` on the same modules.

    `target_r` is the average rank AdaLoRA prunes towards; by default 2/3 of `r_max` (PEFT's own
    12 → 8 ratio). The first 10% of steps are dense (`tinit`) and the last 20% keep the final
    budget (`tfinal`), with a re-allocation every 1/20 of the run (`deltaT`).
    """
    if total_steps < 2:
        raise ValueError(f"AdaLoRA needs total_steps >= 2, got {total_steps}")
    target_modules = config.target_modules if config.target_modules is not None else ENCODER_LINEARS
    adalora = AdaLoraConfig(
        task_type="SEQ_CLS",
        init_r=config.r_max,
        target_r=target_r or max(1, round(config.r_max * 2 / 3)),
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=target_modules,
        modules_to_save=resolve_heads(model, config),
        total_step=total_steps,
        tinit=total_steps // 10,
        tfinal=total_steps // 5,
        deltaT=max(1, total_steps // 20),
        orth_reg_weight=orth_reg_weight,
    )
    return get_peft_model(model, adalora)


def after_optimizer_step(model: nn.Module, global_step: int) -> None:
    """Run what a method needs after each optimizer step, before `zero_grad` (AdaLoRA's budget
    allocation); nothing for SoRA and LoRA."""
    if isinstance(model, PeftModel) and isinstance(model.base_model, AdaLoraModel):
        model.base_model.update_and_allocate(global_step)
