"""The user's own labelled texts: CSV, TSV, JSON Lines or Parquet files, a Hub dataset, or a
folder written by `datasets.save_to_disk`, read with `datasets`' own loaders (Arrow end to end).

``load_own_data`` reads the splits a :class:`DataLocation` names and returns them in the layout
of :func:`sora_tune.data.load_glue` (the text columns under their own names, and ``label``: class
ids as a ``ClassLabel`` or a float32 score), the :class:`GlueTask` describing them, and where each
split came from (:class:`DataSource`: the path or Hub id, and a content digest for lineage and
the tokenisation cache). Every check runs here, on the driver, before a trial starts, and names
the file and the column or row.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from sora_tune.data.tasks import GlueTask, data_name, own_task

__all__ = [
    "FILE_FORMATS",
    "DataLocation",
    "DataSource",
    "OwnData",
    "check_data_file",
    "data_sources",
    "load_own_data",
]

# The `datasets` packaged loader of each extension (and its options), as run_classification.py
# picks them; `.json` is read as JSON Lines, one object per line.
FILE_FORMATS: dict[str, tuple[str, dict]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}
TEXT_FORMATS = {".csv", ".tsv", ".jsonl", ".json"}  # read as UTF-8 text
_CHUNK = 1 << 20  # bytes per read while hashing a file


@dataclass(frozen=True)
class DataSource:
    """Where one split came from: what MLflow records as the trial's dataset input.

    Args:
        split: ``train``, ``validation`` or ``test``.
        name: The file's name, or the dataset id and split.
        source: The file's absolute path, or the Hub id or ``save_to_disk`` folder.
        source_type: ``local`` (a file or folder) or ``hugging_face`` (a Hub id), MLflow's names.
        digest: SHA-256 of the file's bytes (first 16 hex digits), or the split's `datasets`
            fingerprint.
        config: The Hub dataset's configuration (subset), if it has one.
    """

    split: str
    name: str
    source: str
    source_type: str
    digest: str
    config: str | None = None


@dataclass(frozen=True)
class OwnData:
    """The splits read (``train``, and ``validation`` / ``test`` when given), their task, and
    the source of each split."""

    raw: DatasetDict
    task: GlueTask
    sources: tuple[DataSource, ...]


@dataclass(frozen=True)
class DataLocation:
    """Where the user's own data are: files, by extension CSV, TSV, JSON Lines or Parquet; or a
    dataset (a Hub id or a ``save_to_disk`` folder) with its configuration and the names of its
    splits. A split not named is not read. The fields are the trial settings of the same names.

    Raises:
        ValueError: neither a training file nor a dataset, or files and a dataset.
    """

    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    train_split: str = "train"
    validation_split: str | None = None
    test_split: str | None = None

    def __post_init__(self) -> None:
        if self.dataset is not None and self.files():
            raise ValueError(f"give files or a dataset, not both: {self}")
        if self.dataset is None and self.train_file is None:
            raise ValueError(f"give a training file or a dataset: {self}")

    def files(self) -> dict[str, str]:
        """The files given, by split role (``train``, ``validation``, ``test``)."""
        return _given(train=self.train_file, validation=self.validation_file, test=self.test_file)

    def split_names(self) -> dict[str, str]:
        """The dataset's splits given, by split role."""
        return _given(
            train=self.train_split, validation=self.validation_split, test=self.test_split
        )


def _given(**by_role: str | None) -> dict[str, str]:
    return {role: value for role, value in by_role.items() if value is not None}


def check_data_file(setting: str, path: str) -> None:
    """Refuse a data file that does not exist or whose extension names no known format (cheap:
    called when the settings are read).

    Raises:
        ValueError: naming the setting and the file.
    """
    if not Path(path).is_file():
        raise ValueError(f"{setting} {path}: no such file")
    if Path(path).suffix.lower() not in FILE_FORMATS:
        raise ValueError(
            f"{setting} {path}: unknown extension {Path(path).suffix or '(none)'!r}; "
            f"use one of {', '.join(FILE_FORMATS)}"
        )


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of the file, checking on the way that a text file is valid UTF-8 (size and
    modification time are part of the cache key: a rewritten file is hashed again)."""
    digest = hashlib.sha256()
    decoder = (
        codecs.getincrementaldecoder("utf-8")()
        if Path(path).suffix.lower() in TEXT_FORMATS
        else None
    )
    lines = 1
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
            if decoder is not None:
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as err:
                    line = lines + chunk.count(b"\n", 0, max(err.start, 0))
                    raise ValueError(
                        f"{path}: not valid UTF-8 (line {line}): save the file as UTF-8"
                    ) from None
                lines += chunk.count(b"\n")
        if decoder is not None:
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise ValueError(
                    f"{path}: not valid UTF-8 (line {lines}): save the file as UTF-8"
                ) from None
    return digest.hexdigest()[:16]


def file_digest(path: str) -> str:
    """The file's content digest (computed once per version of the file in this process)."""
    stat = os.stat(path)
    return _file_digest(path, stat.st_size, stat.st_mtime_ns)


def load_own_data(
    location: DataLocation,
    *,
    text_columns: tuple[str, ...] = ("text",),
    label_column: str = "label",
    problem_type: str | None = None,
    metric: str | None = None,
) -> OwnData:
    """Read, check and label-encode the user's data.

    Args:
        location: The files, or the dataset and its splits (:class:`DataLocation`).
        text_columns: One column, or two (a pair, as GLUE's pairs).
        label_column: The column of labels.
        problem_type: ``single_label_classification`` or ``regression``; ``None``: from the
            training labels (integers or strings: classification; floats: regression).
        metric: The primary metric; ``None``: accuracy, or Pearson for regression.

    Returns:
        :class:`OwnData`. Class labels become ids into the sorted distinct training labels (a
        Hub ``ClassLabel`` keeps its own names); validation and test labels must be among them.

    Raises:
        ValueError: one line naming the file (or split) and the column or row: an empty file, a
            missing column, empty text cells, a label column with missing cells, one class, or
            lists (multi-label), a label unseen in training, a file that is not UTF-8.
    """
    named = _read_splits(location)
    for where, (split, _) in named.items():
        _check_columns(where, split, [*text_columns, label_column])
        for column in text_columns:
            _check_text(where, split, column)
    train_where, (train, _) = next(iter(named.items()))
    kind = problem_type or _infer_problem_type(train_where, train, label_column)
    label_names = None if kind == "regression" else _label_names(train_where, train, label_column)
    name = data_name(train_file=location.train_file, dataset=location.dataset)
    task = own_task(name, tuple(text_columns), label_names, metric)
    splits, sources = {}, []
    for where, (split, source) in named.items():
        splits[source.split] = _encode(where, split, text_columns, label_column, label_names)
        sources.append(source)
    return OwnData(DatasetDict(splits), task, tuple(sources))


def data_sources(location: DataLocation) -> tuple[DataSource, ...]:
    """Where each split of the user's data comes from, with its digest, without reading the
    rows of a file (a file's digest is computed once per process, and :func:`load_own_data`
    computes it while reading)."""
    if location.dataset is not None:
        return tuple(source for _, source in _read_splits(location).values())
    return tuple(
        DataSource(role, Path(path).name, path, "local", file_digest(path))
        for role, path in location.files().items()
    )


def _read_splits(location: DataLocation) -> dict[str, tuple[Dataset, DataSource]]:
    """Each split given, read, with its source, keyed by how errors name it."""
    if location.dataset is not None:
        return _read_dataset(location.dataset, location.dataset_config, location.split_names())
    return {path: _read_file(role, path) for role, path in location.files().items()}


def _read_file(role: str, path: str) -> tuple[Dataset, DataSource]:
    check_data_file(f"{role}_file", path)
    digest = file_digest(path)  # refuses a text file that is not UTF-8
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the file is empty (no rows)")
    builder, options = FILE_FORMATS[Path(path).suffix.lower()]
    try:
        split = datasets.load_dataset(builder, data_files=path, split="train", **options)
    except Exception as err:  # the loaders raise many kinds; the first line says what failed
        if "corresponds to no data" in str(err):  # how datasets says that no rows were read
            raise ValueError(f"{path}: the file is empty (no rows)") from None
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: cannot be read as {builder}: {reason}") from None
    if len(split) == 0:
        raise ValueError(f"{path}: the file is empty (no rows)")
    return split, DataSource(role, Path(path).name, path, "local", digest)


def _read_dataset(
    dataset: str, config: str | None, split_names: dict[str, str]
) -> dict[str, tuple[Dataset, DataSource]]:
    local = os.path.isdir(dataset)
    if local:
        loaded = datasets.load_from_disk(dataset)
        if isinstance(loaded, Dataset):
            loaded = DatasetDict({"train": loaded})
    else:
        loaded = datasets.load_dataset(dataset, config)
    named = {}
    for role, split in split_names.items():
        if split not in loaded:
            raise ValueError(
                f"dataset {dataset}: no split {split!r} (the {role} split); it has "
                f"{', '.join(loaded)}"
            )
        where = f"dataset {dataset} split {split!r}"
        part = loaded[split]
        if len(part) == 0:
            raise ValueError(f"{where}: the split is empty")
        source = DataSource(
            role,
            f"{dataset}:{split}",
            dataset,
            "local" if local else "hugging_face",
            part._fingerprint,  # datasets' own content fingerprint of the split
            config,
        )
        named[where] = (part, source)
    return named


def _check_columns(where: str, split: Dataset, needed: list[str]) -> None:
    missing = [c for c in needed if c not in split.column_names]
    if missing:
        raise ValueError(
            f"{where}: no column {', '.join(map(repr, missing))}; it has "
            f"{', '.join(split.column_names)}"
        )


def _column(split: Dataset, name: str) -> pa.ChunkedArray:
    return split.with_format("arrow")[name]


def _first_row(mask: pa.ChunkedArray) -> int:
    return pc.index(mask, True).as_py() + 1  # rows counted from 1, the header not counted


def _check_text(where: str, split: Dataset, column: str) -> None:
    values = _column(split, column)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise ValueError(f"{where}: text column {column!r} holds {values.type}, not text")
    empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), True)
    count = pc.sum(empty).as_py() or 0
    if count:
        raise ValueError(
            f"{where}: column {column!r} has {count} empty or missing text cell(s), the first "
            f"in row {_first_row(empty)}"
        )


def _infer_problem_type(where: str, split: Dataset, column: str) -> str:
    feature = split.features[column]
    if isinstance(feature, ClassLabel):
        return "single_label_classification"
    kind = _column(split, column).type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        raise ValueError(
            f"{where}: label column {column!r} holds lists (multi-label): not supported yet; "
            "give one label per row"
        )
    return "regression" if pa.types.is_floating(kind) else "single_label_classification"


def _label_names(where: str, split: Dataset, column: str) -> tuple[str, ...]:
    feature = split.features[column]
    if isinstance(feature, ClassLabel):
        names = tuple(feature.names)
        present = pc.count_distinct(_column(split, column)).as_py()
    else:
        labels = _check_labels(where, split, column)
        distinct = pc.unique(labels)  # a handful of values: their names may be Python strings
        names = tuple(str(v) for v in distinct.take(pc.array_sort_indices(distinct)).to_pylist())
        present = len(names)
    if present < 2:
        raise ValueError(
            f"{where}: label column {column!r} has a single class; a classifier needs two or more"
        )
    return names


def _check_labels(where: str, split: Dataset, column: str) -> pa.ChunkedArray:
    labels = _column(split, column)
    missing = pc.is_null(labels)
    if pa.types.is_string(labels.type) or pa.types.is_large_string(labels.type):
        missing = pc.or_(missing, pc.fill_null(pc.equal(pc.utf8_trim_whitespace(labels), ""), True))
    count = pc.sum(missing).as_py() or 0
    if count:
        raise ValueError(
            f"{where}: label column {column!r} has {count} missing cell(s), the first in row "
            f"{_first_row(missing)}"
        )
    return labels


def _encode(
    where: str,
    split: Dataset,
    text_columns: tuple[str, ...],
    label_column: str,
    label_names: tuple[str, ...] | None,
) -> Dataset:
    """The split with the text columns and ``label``: ids into ``label_names`` (a ClassLabel), or
    a float32 score. Computed in Arrow, batch by batch."""
    features = Features(
        {
            **{c: Value("string") for c in text_columns},
            "label": Value("float32")
            if label_names is None
            else ClassLabel(names=list(label_names)),
        }
    )
    if isinstance(split.features[label_column], ClassLabel):
        ids = _check_labels(where, split, label_column)
        unseen = pc.or_(pc.less(ids, 0), pc.greater_equal(ids, len(label_names or ())))
        if pc.any(unseen).as_py():
            raise ValueError(
                f"{where}: label id {pc.filter(ids, unseen)[0].as_py()} (row "
                f"{_first_row(unseen)}) is not among the training labels"
            )
        return (
            split.select_columns([*text_columns, label_column])
            .rename_column(label_column, "label")
            .cast(features)
        )
    labels = _check_labels(where, split, label_column)
    if label_names is None:
        if not (pa.types.is_floating(labels.type) or pa.types.is_integer(labels.type)):
            raise ValueError(
                f"{where}: label column {label_column!r} holds {labels.type}, not numbers, so it "
                "cannot be regression"
            )
    else:
        unseen = pc.is_null(
            pc.index_in(pc.cast(labels, pa.string()), value_set=pa.array(label_names))
        )
        if pc.any(unseen).as_py():
            value = pc.filter(labels, unseen)[0].as_py()
            raise ValueError(
                f"{where}: label {value!r} (row {_first_row(unseen)}) is not among the training "
                f"labels {', '.join(label_names)}"
            )
    value_set = None if label_names is None else pa.array(label_names)

    def encode(batch: pa.Table) -> pa.Table:
        values = batch[label_column]
        label = (
            pc.cast(values, pa.float32())
            if value_set is None
            else pc.index_in(pc.cast(values, pa.string()), value_set=value_set).cast(pa.int64())
        )
        return pa.table({**{c: batch[c] for c in text_columns}, "label": label})

    return (
        split.with_format("arrow")
        .map(
            encode,
            batched=True,
            batch_size=100_000,
            remove_columns=split.column_names,
            features=features,
            desc="Encoding labels",
        )
        .with_format(None)
    )
