"""Load a GLUE task from the official TSV files or the Hugging Face Hub, and split it honestly.

``load_glue`` returns the task's ``train`` and ``dev`` sets with the columns ``task.text_fields``
plus ``label``. ``make_splits`` holds a validation set out of ``train`` for model selection and
keeps GLUE's dev set as the test set, since GLUE's test labels are not public.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import socket
import threading
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from sklearn.model_selection import train_test_split

from sora_tune.data.files import DataSource
from sora_tune.data.locations import DATA_DIR_ENV
from sora_tune.data.tables import file_digest
from sora_tune.data.tasks import GlueTask, get_task

__all__ = ["DATA_DIR_ENV", "GlueDataUnavailableError", "glue_sources", "load_glue", "make_splits"]

HUB_DATASET = "nyu-mll/glue"
HUB_PROBE_TIMEOUT = 3.0  # seconds; without the probe the Hub client retries DNS for over 20 s
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub reads boolean variables


class GlueDataUnavailableError(ConnectionError):
    """No GLUE folder was given and the Hugging Face Hub cannot be reached."""


@dataclass(frozen=True)
class _TsvLayout:
    """Where a task's fields live in its official TSV files and on the Hub.

    Args:
        columns: Header name of each text field and of ``"label"``.
        header: Column names for a file without a header row (CoLA); ``None`` if it has one.
        dev_file: File name of the dev set inside the task folder.
        hub_config: Configuration of ``nyu-mll/glue``; ``None`` means the task name.
        hub_dev_split: Hub split that matches ``dev_file``.
    """

    columns: Mapping[str, str]
    header: tuple[str, ...] | None = None
    dev_file: str = "dev.tsv"
    hub_config: str | None = None
    hub_dev_split: str = "validation"


_PAIR_COLUMNS = {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}
_MNLI_COLUMNS = {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"}

_LAYOUTS: dict[str, _TsvLayout] = {
    "cola": _TsvLayout(
        {"sentence": "sentence", "label": "label"},
        header=("source", "label", "original_label", "sentence"),
    ),
    "sst2": _TsvLayout({"sentence": "sentence", "label": "label"}),
    "mrpc": _TsvLayout({"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"}),
    "qqp": _TsvLayout(
        {"question1": "question1", "question2": "question2", "label": "is_duplicate"}
    ),
    "stsb": _TsvLayout({"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"}),
    "mnli": _TsvLayout(
        _MNLI_COLUMNS,
        dev_file="dev_matched.tsv",
        hub_config="mnli",
        hub_dev_split="validation_matched",
    ),
    "mnli-mm": _TsvLayout(
        _MNLI_COLUMNS,
        dev_file="dev_mismatched.tsv",
        hub_config="mnli",
        hub_dev_split="validation_mismatched",
    ),
    "qnli": _TsvLayout({"question": "question", "sentence": "sentence", "label": "label"}),
    "rte": _TsvLayout(_PAIR_COLUMNS),
    "wnli": _TsvLayout(_PAIR_COLUMNS),
}


def load_glue(task: GlueTask | str, data_dir: str | os.PathLike | None = None) -> DatasetDict:
    """Load a GLUE task's ``train`` and ``dev`` sets.

    The data come from ``data_dir``, else from the folder in ``$SORA_TUNE_DATA_DIR``, both in the
    official GLUE layout ``<dir>/<task.folder>/{train,dev}.tsv`` (MNLI: ``dev_matched.tsv`` or
    ``dev_mismatched.tsv``); else from the Hub's ``nyu-mll/glue``. A given folder is never
    replaced by the Hub.

    Args:
        task: The task or its name.
        data_dir: Folder in the GLUE layout, e.g. ``../shared/data/glue``.

    Returns:
        ``train`` and ``dev`` datasets with the columns ``task.text_fields`` (strings) and
        ``label`` (class ids as a ``ClassLabel``, or a float32 score for STS-B).

    Raises:
        FileNotFoundError: If the folder, the task's folder in it, or a TSV file is missing.
        ValueError: If a TSV file lacks a column or has a malformed row or an unknown label.
        GlueDataUnavailableError: If no folder is given and the Hub is unreachable, at once when
            ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set, else after a 3 s probe.
    """
    task = get_task(task)
    layout = _LAYOUTS[task.name]
    data_dir = _glue_folder(data_dir)
    if data_dir is None:
        return _load_hub(task, layout)

    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"GLUE data folder {root} does not exist")
    folder = root / task.folder
    if not folder.is_dir():
        raise FileNotFoundError(
            f"GLUE task folder {folder} does not exist: expected {root} in the GLUE layout "
            f"with {task.folder}/train.tsv and {task.folder}/{layout.dev_file}"
        )
    features = _features(task)
    return DatasetDict(
        {
            split: Dataset.from_dict(_read_tsv(folder / file, task, layout), features=features)
            for split, file in (("train", "train.tsv"), ("dev", layout.dev_file))
        }
    )


def glue_sources(
    task: GlueTask | str, data_dir: str | os.PathLike | None = None
) -> tuple[DataSource, ...]:
    """Where :func:`load_glue` reads the task from, with content digests: the folder's
    ``train.tsv`` (the ``train`` context: the validation rows are held out of it) and its dev
    file (``test``), or the Hub's splits with their `datasets` fingerprints."""
    task = get_task(task)
    layout = _LAYOUTS[task.name]
    data_dir = _glue_folder(data_dir)
    roles = (("train", "train.tsv", "train"), ("test", layout.dev_file, layout.hub_dev_split))
    if data_dir is None:
        config = _hub_config(task, layout)
        hub = datasets.load_dataset(HUB_DATASET, config)  # cached: load_glue has read it
        return tuple(
            DataSource(role, f"{HUB_DATASET}:{split}", HUB_DATASET, "hugging_face",
                       hub[split]._fingerprint, config, len(hub[split]))
            for role, _, split in roles
        )  # fmt: skip
    folder = Path(os.path.abspath(os.path.expanduser(data_dir))) / task.folder
    return tuple(
        DataSource(role, f"{task.folder}/{file}", str(folder / file), "local",
                   file_digest(str(folder / file)), num_rows=_tsv_rows(task, folder / file))
        for role, file, _ in roles
    )  # fmt: skip


def _tsv_rows(task: GlueTask, path: Path) -> int:
    """The rows `load_glue` reads from the file (counted once per version of the file)."""
    stat = path.stat()
    return _counted_tsv_rows(task.name, str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _counted_tsv_rows(task: str, path: str, size: int, mtime_ns: int) -> int:
    rows = _read_tsv(Path(path), get_task(task), _LAYOUTS[task])
    return len(rows["label"])


def _glue_folder(data_dir: str | os.PathLike | None) -> str | os.PathLike | None:
    """The GLUE folder to read: `data_dir`, else `$SORA_TUNE_DATA_DIR`; `None`: the Hub."""
    return data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None


def _hub_config(task: GlueTask, layout: _TsvLayout) -> str:
    return layout.hub_config or task.name


def _features(task: GlueTask) -> Features:
    label = Value("float32") if task.is_regression else ClassLabel(names=list(task.label_names))
    return Features({**{field: Value("string") for field in task.text_fields}, "label": label})


def _label_parser(task: GlueTask) -> tuple[Callable[[str], float | int], str]:
    """Return a function reading a label cell, and a description of what it accepts."""
    if task.is_regression:
        return float, "a number"
    # Files give class ids (0/1) or class names (entailment, ...); both map to the id.
    ids = {name: i for i, name in enumerate(task.label_names)}
    ids.update({str(i): i for i in range(task.num_labels)})
    return ids.__getitem__, f"one of {sorted(ids)}"


def _read_tsv(path: Path, task: GlueTask, layout: _TsvLayout) -> dict[str, list]:
    fields = (*task.text_fields, "label")
    parse_label, accepted = _label_parser(task)
    columns: dict[str, list] = {field: [] for field in fields}
    # Quoting off: '"' in MRPC, STS-B and CoLA text is literal and often unbalanced; quoting on
    # silently merges rows. utf-8-sig drops MRPC's byte-order mark, which would otherwise stick
    # to its first column name.
    with open(path, encoding="utf-8-sig", newline="") as file:
        rows = csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = layout.header or next(rows, [])
        missing = [layout.columns[f] for f in fields if layout.columns[f] not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; the header is {header}")
        index = {field: header.index(layout.columns[field]) for field in fields}
        for row in rows:
            if not row:  # a blank line, e.g. an extra newline at the end of the file
                continue
            where = f"{path}, line {rows.line_num}"
            if len(row) != len(header):
                raise ValueError(
                    f"{where}: expected {len(header)} tab-separated fields, got {len(row)}"
                )
            for field in task.text_fields:
                columns[field].append(row[index[field]])
            value = row[index["label"]].strip()
            try:
                columns["label"].append(parse_label(value))
            except (KeyError, ValueError):
                raise ValueError(f"{where}: label {value!r} is not {accepted}") from None
    return columns


def _load_hub(task: GlueTask, layout: _TsvLayout) -> DatasetDict:
    reason = _hub_unreachable_reason()
    if reason is not None:
        raise GlueDataUnavailableError(
            f"Cannot load GLUE task {task.name!r}: no data folder was given and the Hugging Face "
            f"Hub is unreachable ({reason}). Pass --data-dir or set {DATA_DIR_ENV} to a folder in "
            f"the GLUE layout, with {task.folder}/train.tsv and {task.folder}/{layout.dev_file}."
        )
    hub = datasets.load_dataset(HUB_DATASET, _hub_config(task, layout))
    columns = [*task.text_fields, "label"]
    features = _features(task)
    return DatasetDict(
        {
            split: hub[hub_split].select_columns(columns).cast(features)
            for split, hub_split in (("train", "train"), ("dev", layout.hub_dev_split))
        }
    )


def _hub_unreachable_reason() -> str | None:
    """Say why the Hub cannot be reached, or return None if a TCP connection succeeds."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").strip().upper() in _TRUE_VALUES:
            return f"{variable} is set"
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    target = endpoint
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        target = urlsplit(proxy)  # behind a proxy only the proxy needs to answer
    host, port = target.hostname or "", target.port or (443 if target.scheme == "https" else 80)
    if not _can_connect(host, port, HUB_PROBE_TIMEOUT):
        return f"no connection to {host}:{port} within {HUB_PROBE_TIMEOUT:g} s"
    return None


def _can_connect(host: str, port: int, timeout: float) -> bool:
    # The name lookup has no timeout of its own, so the whole probe runs in a daemon thread that
    # is abandoned when it takes too long.
    connected = threading.Event()

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                connected.set()
        except OSError:
            pass

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)  # returns early when the connection succeeds or is refused
    return connected.is_set()


def make_splits(
    raw: DatasetDict,
    task: GlueTask | str,
    *,
    val_size: float | int = 0.1,
    seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> DatasetDict:
    """Split a loaded task into ``train``, ``val`` and ``test`` for honest model selection.

    ``val`` is ``raw["validation"]`` when given (own data), else a seeded hold-out of
    ``raw["train"]``, stratified by label (by score quintile for regression), and ``train`` is
    the rest; ``test`` is ``raw["dev"]`` (GLUE) or ``raw["test"]``, and is left out when there is
    neither. Subsampling happens after the
    hold-out, so ``val`` never overlaps ``train``. Subsamples are stratified too, except where a
    class is too rare to stratify, and keep the original row order. The result depends only on
    the data and the arguments.

    Args:
        raw: Output of :func:`load_glue` (``train``, ``dev``) or of :func:`load_own_data`
            (``train``, and ``validation`` and ``test`` when given).
        task: The task or its name.
        val_size: Share of ``raw["train"]`` held out (0 < x < 1), or a number of rows.
        seed: Seed of the hold-out and the subsamples.
        max_train_samples: Keep at most this many training rows; ``None`` keeps all.
        max_eval_samples: Keep at most this many rows in each of ``val`` and ``test``.

    Raises:
        ValueError: If ``raw`` lacks a split or an argument is out of range (the message names it).
    """
    task = get_task(task)
    if "train" not in raw:
        raise ValueError(f"raw lacks the split 'train'; it has {list(raw)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    limits = {"max_train_samples": max_train_samples, "max_eval_samples": max_eval_samples}
    for name, value in limits.items():
        if value is not None and not _is_count(value):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")

    test = raw["dev"] if "dev" in raw else raw.get("test")
    splits = {"train": raw["train"], "val": raw.get("validation")}
    if splits["val"] is None:
        splits["train"], splits["val"] = _hold_out(raw["train"], task, val_size, seed)
    if test is not None:
        splits["test"] = test
    limits = {"train": max_train_samples, "val": max_eval_samples, "test": max_eval_samples}
    for name, split in splits.items():
        if limits[name] is not None and limits[name] < len(split):
            splits[name] = split.select(_split_rows(split, task, limits[name], seed)[1])
    return DatasetDict(splits)


def _hold_out(
    train: Dataset, task: GlueTask, val_size: float | int, seed: int
) -> tuple[Dataset, Dataset]:
    """``train`` without its stratified, seeded hold-out, and the hold-out."""
    n_rows = len(train)
    if _is_count(val_size):
        n_val = val_size
    elif isinstance(val_size, float) and 0 < val_size < 1:
        n_val = math.ceil(val_size * n_rows)
    else:
        raise ValueError(
            f"val_size must be a fraction in (0, 1) or a positive int, got {val_size!r}"
        )
    if n_val >= n_rows:
        raise ValueError(
            f"val_size={val_size!r} holds out {n_val} of {n_rows} rows: none left to train on"
        )

    train_rows, val_rows = _split_rows(train, task, n_val, seed, rare_side="rest")
    return train.select(train_rows), train.select(val_rows)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _split_rows(
    dataset: Dataset, task: GlueTask, size: int, seed: int, *, rare_side: str = "drawn"
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``size`` rows, stratified where possible; return the (rest, drawn) row indices.

    A class of one row cannot be on both sides, and it would turn the whole draw into an
    unstratified one: it goes to ``rare_side`` (``rest``: a hold-out leaves it in training;
    ``drawn``: a subsample keeps it) and the other rows are drawn stratified."""
    labels = dataset.with_format("arrow")["label"].to_numpy()  # not a list of Python ints
    if task.is_regression:
        # Stratify scores by quintile so every part keeps the score distribution.
        labels = np.digitize(labels, np.quantile(labels, [0.2, 0.4, 0.6, 0.8]))
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    rare = counts[inverse.reshape(-1)] < 2
    pool, fixed = np.flatnonzero(~rare), np.flatnonzero(rare)
    need = size - len(fixed) if rare_side == "drawn" else size
    if not 0 < need < len(pool):  # hardly a row besides the rare ones: a plain draw of all
        pool, fixed, need = np.arange(len(labels)), fixed[:0], size
    counts = np.unique(labels[pool], return_counts=True)[1]
    # scikit-learn cannot stratify with a class of one row, or with fewer rows than classes on
    # either side; tiny subsamples then fall back to a plain seeded draw.
    stratify = counts.min() >= 2 and min(need, len(pool) - need) >= len(counts)
    rest, drawn = train_test_split(
        pool,
        test_size=need,
        random_state=seed,
        stratify=labels[pool] if stratify else None,
    )
    if rare_side == "drawn":
        drawn = np.concatenate([drawn, fixed])
    else:
        rest = np.concatenate([rest, fixed])
    return np.sort(rest), np.sort(drawn)
