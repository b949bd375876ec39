"""The SoRA method: layer, gate optimizer, ξ schedule, pruning and export. No Ray, no MLflow here."""

from .baselines import add_adalora, after_optimizer_step, lora_config
from .config import ENCODER_LINEARS, SoRAConfig
from .layer import SoRALinear, soft_threshold
from .model import (
    adapter_state_dict,
    add_sora,
    export_peft,
    head_params,
    load_adapter,
    module_ranks,
    param_groups,
    prune,
    rank_pattern,
    retained_params,
    save_adapter,
    set_merged,
    sora_layers,
)
from .optimizer import ProximalGateOptimizer
from .schedule import XiSchedule

__all__ = [
    "ENCODER_LINEARS",
    "ProximalGateOptimizer",
    "SoRAConfig",
    "SoRALinear",
    "XiSchedule",
    "adapter_state_dict",
    "add_adalora",
    "add_sora",
    "after_optimizer_step",
    "export_peft",
    "head_params",
    "load_adapter",
    "lora_config",
    "module_ranks",
    "param_groups",
    "prune",
    "rank_pattern",
    "retained_params",
    "save_adapter",
    "set_merged",
    "soft_threshold",
    "sora_layers",
]
