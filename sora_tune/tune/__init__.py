"""The search: Ray Tune + Optuna over trial settings, every trial recorded in MLflow."""

from ..uris import check_tracking_uri
from .search import SearchConfig, SearchResult, resume_search, run_search
from .space import SearchSpace, load_search_space

__all__ = [
    "SearchConfig",
    "SearchResult",
    "SearchSpace",
    "check_tracking_uri",
    "load_search_space",
    "resume_search",
    "run_search",
]
