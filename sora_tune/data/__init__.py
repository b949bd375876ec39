"""GLUE data for one training trial: load, split, tokenize (cached), batch, score.

Typical use::

    raw = load_glue("mrpc", data_dir)
    splits = tokenize_splits(make_splits(raw, "mrpc", seed=0), "mrpc", tokenizer)
    loader = make_dataloader(splits["train"], tokenizer, batch_size=32, shuffle=True)
    metrics = compute_metrics("mrpc", logits, labels)
"""

from sora_tune.data.batching import (
    CACHE_ENV,
    EpochSampler,
    make_dataloader,
    padding_ratio,
    tokenize_splits,
)
from sora_tune.data.glue import DATA_DIR_ENV, GlueDataUnavailableError, load_glue, make_splits
from sora_tune.data.metrics import compute_metrics
from sora_tune.data.tasks import TASKS, GlueTask, get_task

__all__ = [
    "CACHE_ENV",
    "DATA_DIR_ENV",
    "TASKS",
    "EpochSampler",
    "GlueDataUnavailableError",
    "GlueTask",
    "compute_metrics",
    "get_task",
    "load_glue",
    "make_dataloader",
    "make_splits",
    "padding_ratio",
    "tokenize_splits",
]
