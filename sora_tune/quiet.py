"""Library chatter kept off a user's terminal: transformers' load reports, Hugging Face and MLflow
progress bars, MLflow's INFO logs, and library deprecation warnings. A trial gets these settings
as its environment; `pareto`, `register` and `predict` apply them to themselves unless `--debug`
is given, so their output is the table, the registered version or the predictions. A user's own
setting wins."""

from __future__ import annotations

import os
import warnings

QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning",
}


def quiet_this_process() -> None:
    """Apply QUIET_ENV here, before the libraries are imported (they read it once)."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    # PYTHONWARNINGS is read when an interpreter starts: this one needs the filters themselves.
    if os.environ["PYTHONWARNINGS"] == QUIET_ENV["PYTHONWARNINGS"]:
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category)
