"""The user's own labelled texts: CSV, TSV, JSON Lines or Parquet files (read by
:mod:`sora_tune.data.tables`, the reader `predict` uses too), a Hub dataset, or a folder written
by `datasets.save_to_disk`, in Arrow end to end.

``load_own_data`` reads the splits a :class:`DataLocation` names and returns them in the layout
of :func:`sora_tune.data.load_glue` (the text columns under their own names, and ``label``: class
ids as a ``ClassLabel`` or a float32 score), the :class:`GlueTask` describing them, and where each
split came from (:class:`DataSource`: the path or Hub id, and a content digest for lineage and
the tokenisation cache). Every check runs here, on the driver, before a trial starts, and names
the file and the column or row.

Labels have one canonical form, by which they are named and matched across splits: a class name
is the text as written, ``True``/``False`` for booleans, the decimal digits of an integer (or of
a float with no fraction: ``1.0`` is ``1``), the shortest round-trip digits of any other float.
The labels of a CSV or TSV file are text; a column of integers alone, numbers alone or booleans
alone is read as such, as pandas would type it. A ``ClassLabel`` split is read by its names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features, Value

from sora_tune.data.tables import (
    check_data_file,
    check_text,
    file_digest,
    first_row,
    plain,
    read_table,
)
from sora_tune.data.tasks import GlueTask, data_name, own_task

__all__ = [
    "DataLocation",
    "DataSource",
    "OwnData",
    "check_data_file",
    "data_sources",
    "load_own_data",
]

DEFAULT_TRAIN_SPLIT = "train"  # a dataset's split to train on when none is named
# Booleans as CSV and TSV files spell them (pandas' and Arrow's spellings); a label column of
# these alone holds booleans.
_BOOLEAN_SPELLINGS = {"True": True, "true": True, "TRUE": True}
_BOOLEAN_SPELLINGS |= {"False": False, "false": False, "FALSE": False}
_INTEGER = r"[+-]?\d+"
_NUMBER = r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?"


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
        num_rows: The rows read from it.
    """

    split: str
    name: str
    source: str
    source_type: str
    digest: str
    config: str | None = None
    num_rows: int | None = None


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
    splits (the training split: ``train`` when not named). A split not named is not read. The
    fields are the trial settings of the same names.

    Raises:
        ValueError: neither a training file nor a dataset, or files and a dataset.
    """

    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    train_split: str | None = None
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
            train=self.train_split or DEFAULT_TRAIN_SPLIT,
            validation=self.validation_split,
            test=self.test_split,
        )


def _given(**by_role: str | None) -> dict[str, str]:
    return {role: value for role, value in by_role.items() if value is not None}


@dataclass(frozen=True)
class _Split:
    """One split as read: its rows, where it came from, and how errors name it.

    ``typed``: its columns carry their own types (JSON, Parquet, a dataset); CSV and TSV cells
    are text. ``class_names``: the names of each ``ClassLabel`` column, already applied (the
    column holds the names).
    """

    where: str
    table: pa.Table | None  # None: only its source was asked for, and its rows are known
    source: DataSource
    typed: bool
    class_names: dict[str, tuple[str, ...]] = field(default_factory=dict)


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
            training labels (integers, booleans or strings: classification; floats: regression).
        metric: The primary metric; ``None``: accuracy, or Pearson for regression.

    Returns:
        :class:`OwnData`. Class labels become ids into the sorted distinct training labels (a
        ``ClassLabel`` keeps its own names); validation and test labels must be among them,
        matched by their canonical form (see the module docstring).

    Raises:
        ValueError: one line naming the file (or split) and the column or row: see
            :func:`sora_tune.data.tables.read_table`, and a missing column, empty text cells, a
            label column with missing or NaN cells, one class, lists (multi-label), numbers
            mixed with text, one class spelled with and without surrounding spaces, a label
            unseen in training.
    """
    splits = [_typed_labels(split, label_column, problem_type) for split in _read_splits(location)]
    for split in splits:
        _check_columns(split, [*text_columns, label_column])
        for column in text_columns:
            check_text(split.where, split.table, column)
    train = splits[0]
    kind = problem_type or _infer_problem_type(train, label_column)
    label_names = None if kind == "regression" else _label_names(train, label_column)
    name = data_name(train_file=location.train_file, dataset=location.dataset)
    task = own_task(name, tuple(text_columns), label_names, metric)
    encoded = {
        split.source.split: _encode(split, text_columns, label_column, label_names)
        for split in splits
    }
    return OwnData(DatasetDict(encoded), task, tuple(split.source for split in splits))


def data_sources(location: DataLocation) -> tuple[DataSource, ...]:
    """Where each split of the user's data comes from, with its digest and rows (a file is read
    once per version of it in this process: :func:`load_own_data` has usually read it)."""
    return tuple(split.source for split in _read_splits(location, counts_only=True))


_ROWS_READ: dict[tuple[str, int, int], int] = {}  # (path, size, mtime) -> rows of that version


def _read_splits(location: DataLocation, *, counts_only: bool = False) -> list[_Split]:
    """Each split given, read, in the order train, validation, test."""
    if location.dataset is not None:
        return _read_dataset(location.dataset, location.dataset_config, location.split_names())
    splits = []
    for role, path in location.files().items():
        check_data_file(f"{role}_file", path)
        stat = os.stat(path)
        version = (path, stat.st_size, stat.st_mtime_ns)
        table = None if counts_only and version in _ROWS_READ else read_table(path)
        if table is not None:
            _ROWS_READ[version] = table.num_rows
        source = DataSource(
            role, Path(path).name, path, "local", file_digest(path), num_rows=_ROWS_READ[version]
        )
        typed = Path(path).suffix.lower() not in (".csv", ".tsv")
        splits.append(_Split(path, table, source, typed))
    return splits


def _read_dataset(dataset: str, config: str | None, split_names: dict[str, str]) -> list[_Split]:
    local = os.path.isdir(dataset)
    if local:
        loaded = datasets.load_from_disk(dataset)
        if isinstance(loaded, Dataset):
            loaded = DatasetDict({DEFAULT_TRAIN_SPLIT: loaded})
    else:
        loaded = datasets.load_dataset(dataset, config)
    splits = []
    for role, name in split_names.items():
        if name not in loaded:
            raise ValueError(
                f"dataset {dataset}: no split {name!r} (the {role} split); it has "
                f"{', '.join(loaded)}"
            )
        where = f"dataset {dataset} split {name!r}"
        part = loaded[name]
        if len(part) == 0:
            raise ValueError(f"{where}: the split is empty")
        source = DataSource(
            role,
            f"{dataset}:{name}",
            dataset,
            "local" if local else "hugging_face",
            part._fingerprint,  # datasets' own content fingerprint of the split
            config,
            len(part),
        )
        table = part.with_format("arrow")[:]
        class_names = {
            column: tuple(feature.names)
            for column, feature in part.features.items()
            if isinstance(feature, ClassLabel)
        }
        for column, names in class_names.items():  # ids as names: splits are matched by name
            index = table.schema.get_field_index(column)
            table = table.set_column(index, column, _class_names(table[column], names))
        splits.append(_Split(where, table, source, True, class_names))
    return splits


def _class_names(ids: pa.ChunkedArray, names: tuple[str, ...]) -> pa.ChunkedArray:
    """ClassLabel ids as their names; an id with no name (datasets' -1: no label) is missing."""
    known = pc.and_(pc.greater_equal(ids, 0), pc.less(ids, len(names)))
    safe = pc.if_else(known, ids, 0)
    return pc.if_else(known, pc.take(pa.array(names, pa.string()), safe), None)


def _typed_labels(split: _Split, column: str, problem_type: str | None) -> _Split:
    """The split with the labels of a CSV or TSV file typed as pandas would: integers alone,
    numbers alone or booleans alone become so; anything else stays text. With the problem type
    left to infer, numbers mixed with text are refused: a score column with a stray "NA" would
    otherwise become hundreds of classes."""
    if split.typed or column not in split.table.column_names:
        return split
    labels = split.table[column]
    given = pc.drop_null(labels)
    kind = next(
        (
            kind
            for pattern, kind in ((_INTEGER, pa.int64()), (_NUMBER, pa.float64()))
            if pc.all(pc.match_substring_regex(given, f"^{pattern}$")).as_py() is not False
        ),
        None,
    )
    if kind is not None:
        typed = pc.cast(labels, kind)
    elif pc.all(pc.is_in(given, pa.array(list(_BOOLEAN_SPELLINGS)))).as_py():
        spellings = pa.array(list(_BOOLEAN_SPELLINGS))
        values = pa.array(list(_BOOLEAN_SPELLINGS.values()))
        typed = pc.take(values, pc.index_in(labels, value_set=spellings))
    else:
        number = pc.fill_null(pc.match_substring_regex(labels, f"^{_NUMBER}$"), False)
        if problem_type is None and pc.any(number).as_py():
            text = pc.and_(pc.invert(number), pc.is_valid(labels))
            raise ValueError(
                f"{split.where}: label column {column!r} holds numbers and text "
                f"({pc.filter(labels, text)[0].as_py()!r} in row {first_row(text)}): fix those "
                "rows, or give --problem-type single_label_classification to take every label "
                "as a class name"
            )
        return split
    index = split.table.schema.get_field_index(column)
    return replace(split, table=split.table.set_column(index, column, typed))


def _check_columns(split: _Split, needed: list[str]) -> None:
    missing = [c for c in needed if c not in split.table.column_names]
    if missing:
        raise ValueError(
            f"{split.where}: no column {', '.join(map(repr, missing))}; it has "
            f"{', '.join(split.table.column_names)}"
        )


def _infer_problem_type(split: _Split, column: str) -> str:
    if column in split.class_names:
        return "single_label_classification"
    return (
        "regression"
        if pa.types.is_floating(_labels(split, column).type)
        else ("single_label_classification")
    )


def _labels(split: _Split, column: str) -> pa.ChunkedArray:
    """The split's labels, checked: no lists, no missing, NaN or blank cells."""
    labels = plain(split.table[column])
    kind = labels.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        raise ValueError(
            f"{split.where}: label column {column!r} holds lists (multi-label): not supported "
            "yet; give one label per row"
        )
    missing = pc.is_null(labels, nan_is_null=True)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        missing = pc.or_(missing, pc.fill_null(pc.equal(pc.utf8_trim_whitespace(labels), ""), True))
    count = pc.sum(missing).as_py() or 0
    if count:
        raise ValueError(
            f"{split.where}: label column {column!r} has {count} missing cell(s), the first in "
            f"row {first_row(missing)}"
        )
    return labels


def _canonical(where: str, column: str, labels: pa.ChunkedArray) -> pa.ChunkedArray:
    """Labels as class names (the module docstring's canonical form)."""
    kind = labels.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return labels.cast(pa.string())
    if pa.types.is_boolean(kind):
        return pc.if_else(labels, "True", "False")
    if pa.types.is_integer(kind):
        return labels.cast(pa.string())
    if pa.types.is_floating(kind):
        # A float with no fraction is named as the integer it is, so 1.0 and 1 are one class;
        # 2**53 bounds the floats whose integer is exact.
        whole = pc.and_(pc.equal(pc.floor(labels), labels), pc.less(pc.abs(labels), 2.0**53))
        as_integer = pc.floor(labels).cast(pa.int64(), safe=False).cast(pa.string())
        return pc.if_else(whole, as_integer, labels.cast(pa.string()))
    raise ValueError(
        f"{where}: label column {column!r} holds {kind}: give text, integers, booleans or numbers"
    )


def _label_names(split: _Split, column: str) -> tuple[str, ...]:
    """The class names: a ClassLabel's own, else the distinct labels in their sorted order
    (numbers by value), each in its canonical form."""
    labels = _labels(split, column)
    if column in split.class_names:
        names = split.class_names[column]
        present = pc.count_distinct(labels).as_py()
    else:
        distinct = pc.unique(labels)
        distinct = distinct.take(pc.sort_indices(distinct))
        names = tuple(_canonical(split.where, column, pa.chunked_array([distinct])).to_pylist())
        present = len(names)
        _check_spellings(split, column, names, labels)
    if present < 2:
        raise ValueError(
            f"{split.where}: label column {column!r} has a single class; a classifier needs two "
            "or more"
        )
    return names


def _check_spellings(
    split: _Split, column: str, names: tuple[str, ...], labels: pa.ChunkedArray
) -> None:
    """Refuse one class spelled two ways, with and without surrounding spaces: silently they
    would be two classes, and stripping would change labels the user wrote."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(name.strip(), name)
        if other != name:
            row = first_row(pc.equal(_canonical(split.where, column, labels), name))
            raise ValueError(
                f"{split.where}: label column {column!r} spells one class two ways, {other!r} "
                f"and {name!r} (row {row}): remove the spaces around the labels"
            )


def _encode(
    split: _Split,
    text_columns: tuple[str, ...],
    label_column: str,
    label_names: tuple[str, ...] | None,
) -> Dataset:
    """The split with the text columns and ``label``: ids into ``label_names`` (a ClassLabel), or
    a float32 score. Computed in Arrow."""
    labels = _labels(split, label_column)
    if label_names is None:
        if not (pa.types.is_floating(labels.type) or pa.types.is_integer(labels.type)):
            raise ValueError(
                f"{split.where}: label column {label_column!r} holds {labels.type}, not numbers, "
                "so it cannot be regression"
            )
        encoded, label_feature = labels.cast(pa.float32()), Value("float32")
    else:
        names = _canonical(split.where, label_column, labels)
        encoded = pc.index_in(names, value_set=pa.array(label_names, pa.string()))
        unseen = pc.is_null(encoded)
        if pc.any(unseen).as_py():
            value = pc.filter(names, unseen)[0].as_py()
            near = [name for name in label_names if name.strip() == value.strip()]
            hint = f": the training labels spell it {near[0]!r}" if near else ""
            raise ValueError(
                f"{split.where}: label {value!r} (row {first_row(unseen)}) is not among the "
                f"training labels {', '.join(label_names)}{hint}"
            )
        encoded, label_feature = encoded.cast(pa.int64()), ClassLabel(names=list(label_names))
    texts = {c: plain(split.table[c]).cast(pa.string()) for c in text_columns}
    features = Features({**{c: Value("string") for c in text_columns}, "label": label_feature})
    return Dataset(pa.table({**texts, "label": encoded}), info=DatasetInfo(features=features))
