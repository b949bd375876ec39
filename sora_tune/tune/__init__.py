"""The search: Ray Tune + Optuna over trial settings, every trial recorded in MLflow."""

from .search import SearchConfig, check_tracking_uri, resume_search, run_search
from .space import SearchSpace, load_search_space

__all__ = [
    "SearchConfig",
    "SearchSpace",
    "check_tracking_uri",
    "load_search_space",
    "resume_search",
    "run_search",
]
