"""sora-tune: find the best SoRA adapters with a distributed hyperparameter search.

The method's names are imported on first use, so that `import sora_tune` (and the CLI, which
checks its input before anything else) does not pay for torch and PEFT up front.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

__all__ = [
    "ProximalGateOptimizer",
    "SoRAConfig",
    "XiSchedule",
    "add_sora",
    "export_peft",
    "prune",
    "retained_params",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".sora", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
