"""sora-tune: find the best SoRA adapters with a distributed hyperparameter search."""

from .sora import (
    ProximalGateOptimizer,
    SoRAConfig,
    XiSchedule,
    add_sora,
    export_peft,
    prune,
    retained_params,
)

__version__ = "0.1.0"

__all__ = [
    "ProximalGateOptimizer",
    "SoRAConfig",
    "XiSchedule",
    "add_sora",
    "export_peft",
    "prune",
    "retained_params",
]
