"""Data for one training trial, GLUE or the user's own: load, split, tokenize (cached), batch,
score.

Typical use::

    raw = load_glue("mrpc", data_dir)  # or load_own_data(DataLocation(train_file=...)).raw
    splits = tokenize_splits(make_splits(raw, "mrpc", seed=0), "mrpc", tokenizer)
    loader = make_dataloader(splits["train"], tokenizer, batch_size=32, shuffle=True)
    metrics = compute_metrics("mrpc", logits, labels)

Names load from their modules on first use (PEP 562): the task table and the data locations
come without datasets and torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .batching import (
        EpochSampler,
        make_dataloader,
        padding_ratio,
        pair_separator,
        shard_loader,
        tokenize_splits,
    )
    from .files import DataLocation, DataSource, OwnData, data_sources, load_own_data
    from .glue import GlueDataUnavailableError, glue_sources, load_glue, make_splits
    from .locations import CACHE_ENV, DATA_DIR_ENV
    from .metrics import compute_metrics
    from .tables import read_table
    from .tasks import TASKS, GlueTask, get_task, own_task

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "batching": (
            "EpochSampler",
            "make_dataloader",
            "padding_ratio",
            "pair_separator",
            "shard_loader",
            "tokenize_splits",
        ),
        "files": ("DataLocation", "DataSource", "OwnData", "data_sources", "load_own_data"),
        "tables": ("read_table",),
        "glue": ("GlueDataUnavailableError", "glue_sources", "load_glue", "make_splits"),
        "locations": ("CACHE_ENV", "DATA_DIR_ENV"),
        "metrics": ("compute_metrics",),
        "tasks": ("TASKS", "GlueTask", "get_task", "own_task"),
    },
)
