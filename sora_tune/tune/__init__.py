"""The search: Ray Tune + Optuna over trial settings, every trial recorded in MLflow.

Names load from their modules on first use (PEP 562): `SearchConfig` and the search spaces come
without Ray, so the CLI builds its flags from them before anything heavy is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .config import SearchConfig
    from .search import SearchResult, resume_search, run_search
    from .space import SearchSpace, load_search_space

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "config": ("SearchConfig",),
        "search": ("SearchResult", "resume_search", "run_search"),
        "space": ("SearchSpace", "load_search_space"),
    },
)
