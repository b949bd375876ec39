"""sora-tune: find the best SoRA adapters with a distributed hyperparameter search.

The method's names are imported on first use, so that `import sora_tune` (and the CLI, which
checks its input before anything else) does not pay for torch and PEFT up front.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports
from .quiet import hide_harmless_logs

hide_harmless_logs()  # before anything imports peft, which imports bitsandbytes and torchao

if TYPE_CHECKING:
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

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "sora": (
            "ProximalGateOptimizer",
            "SoRAConfig",
            "XiSchedule",
            "add_sora",
            "export_peft",
            "prune",
            "retained_params",
        )
    },
)
