"""Baselines in the same harness as SoRA.

- ``lora``: the SoRA layer with the gate fixed at 1 and not trained (`config.lora_config`).
- ``adalora``: PEFT's AdaLoRA. Its budget allocator must run after every optimizer step;
  `after_optimizer_step` does that for the caller and is a no-op for the other methods.
"""

from __future__ import annotations

from peft import AdaLoraConfig, PeftModel, get_peft_model
from peft.tuners.adalora import AdaLoraModel
from torch import nn

from .config import SoRAConfig
from .model import keep_in_fp32, resolve_heads
from .targets import resolve_targets


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
    heads = resolve_heads(model, config)
    for head in heads:  # PEFT trains a copy of each: an fp32 one
        keep_in_fp32(model.get_submodule(head))
    adalora = AdaLoraConfig(
        task_type="SEQ_CLS",
        init_r=config.r_max,
        target_r=target_r or max(1, round(config.r_max * 2 / 3)),
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=resolve_targets(model, config.target_modules, exclude=heads),
        modules_to_save=heads,
        total_step=total_steps,
        tinit=total_steps // 10,
        tfinal=total_steps // 5,
        deltaT=max(1, total_steps // 20),
        orth_reg_weight=orth_reg_weight,
    )
    peft_model = get_peft_model(model, adalora)
    # PEFT's fp32 copy of the adapter on a bf16 or fp16 base (autocast_adapter_dtype) makes the
    # rank counts it divides by trainable parameters; they are constants.
    for name, p in peft_model.named_parameters():
        if ".ranknum." in name:
            p.requires_grad_(False)
    return peft_model


def after_optimizer_step(model: nn.Module, global_step: int) -> None:
    """Run what a method needs after each optimizer step, before `zero_grad` (AdaLoRA's budget
    allocation); nothing for SoRA and LoRA."""
    adalora = _adalora(model)
    if adalora is not None:
        adalora.update_and_allocate(global_step)


def _adalora(model: nn.Module) -> AdaLoraModel | None:
    if isinstance(model, PeftModel) and isinstance(model.base_model, AdaLoraModel):
        return model.base_model
    return None


def adalora_state(model: nn.Module) -> dict | None:
    """What AdaLoRA's budget allocation keeps between steps besides the weights: the importance
    scores of its rank allocator and the rank pattern it has fixed. `None` for other methods.

    A resumed AdaLoRA run needs them to go on as if never stopped: without the scores it
    re-allocates from scratch, and after the budget is final it masks with no pattern at all.
    """
    adalora = _adalora(model)
    if adalora is None:
        return None
    allocator = adalora.rankallocator
    return {
        "ipt": dict(allocator.ipt),
        "exp_avg_ipt": dict(allocator.exp_avg_ipt),
        "exp_avg_unc": dict(allocator.exp_avg_unc),
        "rank_pattern": adalora.peft_config[adalora.trainable_adapter_name].rank_pattern,
    }


def load_adalora_state(model: nn.Module, state: dict | None) -> None:
    """Restore what `adalora_state` returned into an AdaLoRA model (nothing for other methods);
    tensors move to the device of the parameter they score."""
    adalora = _adalora(model)
    if adalora is None or state is None:
        return
    params = dict(adalora.model.named_parameters())
    allocator = adalora.rankallocator
    for name in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        setattr(
            allocator,
            name,
            {key: value.to(params[key].device) for key, value in state[name].items()},
        )
    adalora.peft_config[adalora.trainable_adapter_name].rank_pattern = state["rank_pattern"]
