"""Serving a registered adapter.

`sora_pyfunc.py` is the MLflow models-from-code file of every model `sora_tune.registry`
registers. It is never imported here: running it hands the model object to MLflow
(`mlflow.models.set_model`), and MLflow runs it from the model's own copy at load time.
"""

from pathlib import Path

PYFUNC_FILE = Path(__file__).with_name("sora_pyfunc.py")

__all__ = ["PYFUNC_FILE"]
