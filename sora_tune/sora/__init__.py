"""The SoRA method: layer, gate optimizer, ξ schedule, pruning and export. No Ray, no MLflow here.

Names load from their modules on first use (PEP 562), so that the configs (`SoRAConfig`,
`XiSchedule`) can be read without importing torch and PEFT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .baselines import (
        adalora_state,
        add_adalora,
        after_optimizer_step,
        load_adalora_state,
    )
    from .config import PRESETS, SoRAConfig, lora_config
    from .layer import SoRALinear, soft_threshold
    from .model import (
        adapter_params,
        adapter_state_dict,
        add_sora,
        export_peft,
        gate_quantiles,
        gates_thresholded,
        head_params,
        load_adapter,
        module_ranks,
        param_groups,
        prune,
        rank_pattern,
        resolve_heads,
        retained_params,
        save_adapter,
        set_merged,
        sora_layers,
    )
    from .optimizer import ProximalGateOptimizer
    from .schedule import XiSchedule
    from .targets import resolve_targets, task_heads, transformer_blocks

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "baselines": (
            "adalora_state",
            "add_adalora",
            "after_optimizer_step",
            "load_adalora_state",
        ),
        "config": ("PRESETS", "SoRAConfig", "lora_config"),
        "layer": ("SoRALinear", "soft_threshold"),
        "model": (
            "adapter_params",
            "adapter_state_dict",
            "add_sora",
            "export_peft",
            "gate_quantiles",
            "gates_thresholded",
            "head_params",
            "load_adapter",
            "module_ranks",
            "param_groups",
            "prune",
            "rank_pattern",
            "resolve_heads",
            "retained_params",
            "save_adapter",
            "set_merged",
            "sora_layers",
        ),
        "optimizer": ("ProximalGateOptimizer",),
        "schedule": ("XiSchedule",),
        "targets": ("resolve_targets", "task_heads", "transformer_blocks"),
    },
)
