"""Choose an adapter from a finished search: the val_score-vs-retained_params Pareto front of the
trials recorded in MLflow, its hypervolume, and one run picked by a stated rule. No Ray here."""

from ..front import Selection, default_reference, hypervolume, is_pareto_front, select
from .runs import (
    LeftOut,
    ParetoResult,
    TrialRuns,
    format_table,
    hypervolume_history,
    load_trial_runs,
    pareto_report,
)

__all__ = [
    "LeftOut",
    "ParetoResult",
    "Selection",
    "TrialRuns",
    "default_reference",
    "format_table",
    "hypervolume_history",
    "hypervolume",
    "is_pareto_front",
    "load_trial_runs",
    "pareto_report",
    "select",
]
