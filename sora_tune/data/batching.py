"""From text splits to padded batches: cached tokenization, seeded samplers, dynamic padding.

Tokenized splits are cached on disk under a key of everything that decides their content, so the
trials of a search tokenize each split once. Batches are padded to their longest sequence, not to
``max_length``; :func:`padding_ratio` measures what that saves.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import ClassLabel, Dataset, DatasetDict, load_from_disk
from torch.utils.data import BatchSampler, DataLoader, Sampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase
from transformers.trainer_pt_utils import get_length_grouped_indices

from sora_tune.data.locations import CACHE_ENV
from sora_tune.data.tasks import GlueTask, get_task

__all__ = [
    "CACHE_ENV",
    "EpochSampler",
    "make_dataloader",
    "padding_ratio",
    "pair_separator",
    "shard_loader",
    "tokenize_splits",
]

# Bump when the tokenized layout changes, so caches written by older code are not reused.
_CACHE_VERSION = 2  # 2: `labels` keeps the class names (a ClassLabel)
# The columns a model takes; everything else stays out of the batches.
_MODEL_COLUMNS = ("input_ids", "token_type_ids", "attention_mask", "labels")


def tokenize_splits(
    splits: DatasetDict,
    task: GlueTask | str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int = 128,
    cache_dir: str | os.PathLike | None = None,
    digests: Mapping[str, str] | None = None,
    separator: str | None = None,
) -> DatasetDict:
    """Tokenize every split, reusing an on-disk cache written by earlier calls.

    Each split is cached under a hash of the task, the tokenizer (class, path, vocabulary,
    special tokens, truncation side), ``max_length`` and the split's content, so a changed split or tokenizer
    never hits a stale entry. Entries are written to a temporary folder and renamed into
    place, so a crashed writer leaves no half-written entry and concurrent trials agree.

    Args:
        splits: Splits with the columns ``task.text_fields`` and ``label``.
        task: The task or its name.
        tokenizer: A Hugging Face tokenizer.
        max_length: Longest sequence in tokens; longer inputs are truncated, none are padded.
        cache_dir: Cache folder; default ``$SORA_TUNE_CACHE`` or ``~/.cache/sora_tune/tokenized``.
        digests: A digest of each split's content when the caller knows it (own files: the
            files' digests and the data settings), which spares hashing every row.
        separator: Joins a pair's two texts into one before tokenizing (see
            :func:`pair_separator`); ``None``: the tokenizer's pair template.

    Returns:
        The splits with ``input_ids``, ``attention_mask``, ``token_type_ids`` if the tokenizer
        makes them, and ``labels`` (class ids as a ``ClassLabel`` of the task's label names, or
        float32 for regression), loaded from the cache.

    Raises:
        ValueError: If ``max_length`` is not positive or a split lacks a needed column.
    """
    task = get_task(task)
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    columns = [*task.text_fields, "label"]
    for name, split in splits.items():
        missing = [c for c in columns if c not in split.column_names]
        if missing:
            raise ValueError(f"Split {name!r} lacks column(s) {missing} of task {task.name}")

    root = Path(
        cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sora_tune" / "tokenized"
    ).expanduser()
    tokenizer_key = _tokenizer_fingerprint(tokenizer)
    tokenized = {}
    for name, split in splits.items():
        content = digests[name] if digests and name in digests else _content_hash(split, columns)
        key = _digest(_CACHE_VERSION, task.name, tokenizer_key, max_length, separator, content)
        path = root / f"{task.name}-{name}-{key[:16]}"
        if not path.is_dir():
            tokenized_split = _tokenize(split, task, tokenizer, max_length, separator, key)
            _save_atomically(tokenized_split, path)
        tokenized[name] = load_from_disk(str(path))
    return DatasetDict(tokenized)


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    # Not the backend's own serialisation: it records the truncation and padding of the last
    # call, so it changes from call to call. Hash what decides the tokens instead.
    return _digest(
        type(tokenizer).__name__,
        tokenizer.name_or_path,
        sorted(tokenizer.get_vocab().items()),
        tokenizer.all_special_tokens,
        tokenizer.truncation_side,
    )


def _content_hash(split: Dataset, columns: list[str]) -> str:
    # A content hash, not the datasets fingerprint: the fingerprint is random after some
    # transforms, which would write a new cache entry for every trial.
    digest = hashlib.sha256()
    for batch in split.select_columns(columns).iter(batch_size=10_000):
        digest.update(json.dumps([batch[c] for c in columns]).encode())
    return digest.hexdigest()


def pair_separator(tokenizer: PreTrainedTokenizerBase, setting: str | None = None) -> str | None:
    """What joins a pair's two texts on this tokenizer: ``None`` when its own pair template puts
    tokens between them (BERT's ``[SEP]``, Llama's ``<s>``); else ``setting``, or the
    tokenizer's sep token, or its eos token. GPT-2's, SmolLM2's and Qwen's tokenizers have no
    pair template: they would run the two texts together ("Is it raining?Yes it is.").

    Raises:
        ValueError: the tokenizer has no pair template, no sep or eos token, and no ``setting``.
    """
    first = tokenizer("a", add_special_tokens=False)["input_ids"]
    second = tokenizer("b", add_special_tokens=False)["input_ids"]
    pair = tokenizer("a", "b")["input_ids"]
    together = first + second
    if not any(pair[i : i + len(together)] == together for i in range(len(pair))):
        return None
    separator = setting or tokenizer.sep_token or tokenizer.eos_token
    if separator is None:
        raise ValueError(
            f"the tokenizer of {tokenizer.name_or_path} has no pair template and no sep or eos "
            "token to join a pair of texts: give pair_separator"
        )
    return separator


def _tokenize(
    split: Dataset,
    task: GlueTask,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    separator: str | None,
    key: str,
) -> Dataset:
    label_dtype = np.float32 if task.is_regression else np.int64

    def encode(batch: dict[str, list]) -> dict[str, list | np.ndarray]:
        texts = [batch[field] for field in task.text_fields]
        if separator is not None and len(texts) == 2:
            texts = [[a + separator + b for a, b in zip(*texts, strict=True)]]
        encoded = dict(tokenizer(*texts, truncation=True, max_length=max_length))
        encoded["labels"] = np.asarray(batch["label"], dtype=label_dtype)
        return encoded

    # The cache key is the fingerprint, which also spares datasets from hashing the tokenizer.
    tokenized = split.map(
        encode,
        batched=True,
        remove_columns=split.column_names,
        keep_in_memory=True,
        new_fingerprint=key,
        desc=f"Tokenizing {task.name}",
    )
    if task.label_names is None:
        return tokenized
    # The class names travel with the data: a trial given the tokenised splits reads them here.
    return tokenized.cast_column("labels", ClassLabel(names=list(task.label_names)))


def _save_atomically(dataset: Dataset, path: Path) -> None:
    # A hidden sibling, so the rename stays on one file system; mkdir honours the umask (unlike
    # tempfile.mkdtemp), so other users of a shared cache can read the entry.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir(parents=True)
    try:
        dataset.save_to_disk(tmp)
        os.replace(tmp, path)
    except OSError:
        # A concurrent trial renamed the same entry into place first; it holds the same data.
        if not path.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class EpochSampler(Sampler[int]):
    """Row order for one epoch, reproducible from ``seed`` and the epoch number.

    Call :meth:`set_epoch` before each epoch for a new order (and, resuming inside an epoch,
    the row to start from). The order of epoch ``e`` comes
    from a ``torch.Generator`` seeded from ``(seed, e)`` through NumPy's ``SeedSequence``, so a
    resumed run sees the same order and trials with nearby seeds share no epoch orders (as
    ``seed + e`` would: seed 1 epoch 0 = seed 0 epoch 1).

    Args:
        lengths: Length in tokens of each row.
        batch_size: Rows per batch, used to size the length groups.
        shuffle: Draw a random order; otherwise keep the dataset order.
        seed: Seed of the order.
        group_by_length: With ``shuffle``, shuffle, cut into mega-batches of 50 batches (fewer on
            small data) and sort each by length, as transformers' ``LengthGroupedSampler`` does,
            so batches hold similar lengths and need little padding. Without ``shuffle``, sort
            all rows by length, longest first (a fixed order that suits evaluation).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        group_by_length: bool = False,
    ) -> None:
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Draw epoch `epoch`'s order, from its `start`-th row on (a run resumed inside an
        epoch); `len()` stays the whole epoch's, so a loader's length is its batches per epoch."""
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._order(), self.start, None)

    def _order(self) -> Iterator[int]:
        if not self.shuffle:
            if self.group_by_length:
                return iter(np.argsort(-np.asarray(self.lengths), kind="stable").tolist())
            return iter(range(len(self.lengths)))
        entropy = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(entropy))
        if self.group_by_length:
            return iter(
                get_length_grouped_indices(self.lengths, self.batch_size, generator=generator)
            )
        return iter(torch.randperm(len(self.lengths), generator=generator).tolist())


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _lengths(split: Dataset) -> np.ndarray:
    # Read the lengths from Arrow: iterating the rows would decode every sequence.
    return pc.list_value_length(split.with_format("arrow")["input_ids"]).to_numpy()


def make_dataloader(
    split: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    group_by_length: bool = False,
) -> DataLoader:
    """Batch a tokenized split, padding each batch to its longest sequence.

    The loader's ``sampler`` is an :class:`EpochSampler`: call ``loader.sampler.set_epoch(e)``
    before epoch ``e`` for a new, reproducible order.

    Args:
        split: A split from :func:`tokenize_splits`.
        tokenizer: The tokenizer that made ``split`` (it knows the padding token and side).
        batch_size: Rows per batch; the last batch may be smaller.
        shuffle: Shuffle the rows (training) or keep their order (evaluation).
        seed: Seed of the shuffle.
        group_by_length: Batch rows of similar length; see :class:`EpochSampler`.

    Returns:
        A loader of dicts of tensors: the model inputs and ``labels``.

    Raises:
        ValueError: If ``batch_size`` is not positive or ``split`` has no ``input_ids``.
    """
    _check_batch_size(batch_size)
    if "input_ids" not in split.column_names:
        raise ValueError("split has no input_ids: tokenize it with tokenize_splits first")
    sampler = EpochSampler(
        _lengths(split), batch_size, shuffle=shuffle, seed=seed, group_by_length=group_by_length
    )
    columns = [c for c in _MODEL_COLUMNS if c in split.column_names]
    return DataLoader(
        split.with_format("torch", columns=columns),
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=DataCollatorWithPadding(tokenizer),
    )


class _RowShards(BatchSampler):
    """Worker `rank`'s rows of every batch of `sampler`: a contiguous slice, the shares as even
    as the batch allows (a short last batch may leave a worker none, an empty list). Every worker
    yields as many batches as one process would, so the workers step together."""

    def __init__(self, sampler: Sampler[int], batch_size: int, rank: int, workers: int) -> None:
        super().__init__(sampler, batch_size, drop_last=False)
        self.rank, self.workers = rank, workers

    def __iter__(self) -> Iterator[list[int]]:
        for batch in super().__iter__():
            rows = len(batch)
            yield batch[rows * self.rank // self.workers : rows * (self.rank + 1) // self.workers]


class _BatchShards(BatchSampler):
    """Worker `rank`'s whole batches of `sampler`: batches rank, rank + workers, … (scoring,
    where the batches are independent and their predictions are gathered in order)."""

    def __init__(self, sampler: Sampler[int], batch_size: int, rank: int, workers: int) -> None:
        super().__init__(sampler, batch_size, drop_last=False)
        self.rank, self.workers = rank, workers

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(super().__iter__(), self.rank, None, self.workers)

    def __len__(self) -> int:
        return len(range(self.rank, super().__len__(), self.workers))


def shard_loader(
    loader: DataLoader, rank: int, workers: int, *, whole_batches: bool = False
) -> DataLoader:
    """Worker `rank`'s share, of `workers`, of the batches of a `make_dataloader` loader.

    The batches are the loader's own, drawn in the same order from the same sampler (whose
    `set_epoch` still sets the order): with `whole_batches`, every `workers`-th batch; without, a
    slice of every batch, so that the workers together train on the batches one process would.
    Only the worker's own rows are read and padded. A worker's empty slice is an empty dict.
    """
    shards = _BatchShards if whole_batches else _RowShards
    collate = loader.collate_fn
    return DataLoader(
        loader.dataset,
        batch_sampler=shards(loader.sampler, loader.batch_size, rank, workers),
        collate_fn=lambda rows: collate(rows) if rows else {},
    )


def padding_ratio(
    split: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    group_by_length: bool = False,
    pad_to: int | None = None,
) -> float:
    """Share of padding among the token slots of the batches :func:`make_dataloader` yields.

    With the same ``batch_size``, ``shuffle``, ``seed`` and ``group_by_length`` this measures
    the loader's first epoch; ``pad_to=max_length`` measures padding every row to
    ``max_length`` instead, the baseline that dynamic padding improves on.

    Args:
        split: A split from :func:`tokenize_splits`.
        batch_size: Rows per batch.
        shuffle: As in :func:`make_dataloader`.
        seed: As in :func:`make_dataloader`.
        group_by_length: As in :func:`make_dataloader`.
        pad_to: Pad every batch to this width instead of its longest row.

    Returns:
        Padded slots over all slots, in [0, 1); 0.0 for an empty split.

    Raises:
        ValueError: If ``pad_to`` is shorter than the longest row, or ``batch_size`` < 1.
    """
    _check_batch_size(batch_size)
    lengths = _lengths(split)
    if len(lengths) == 0:
        return 0.0
    if pad_to is not None and pad_to < lengths.max():
        raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({lengths.max()})")
    sampler = EpochSampler(
        lengths, batch_size, shuffle=shuffle, seed=seed, group_by_length=group_by_length
    )
    ordered = lengths[list(sampler)]
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    slots = sum(len(batch) * (pad_to or batch.max()) for batch in batches)
    return float(1.0 - lengths.sum() / slots)
