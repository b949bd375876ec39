"""What a search keeps beside Ray's experiment state, for `--resume`: its settings and MLflow
parent run (`sora_tune_search.json`), and an early-stopping scheduler's rungs. Read and written
through pyarrow's file systems, as Ray resolves its storage: a local or NFS folder, or a URI
such as s3://bucket/path or gs://bucket/path."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow.fs

SEARCH_STATE_FILE = "sora_tune_search.json"


def _file(folder: str | os.PathLike, name: str) -> tuple[pyarrow.fs.FileSystem, str]:
    import pyarrow.fs

    folder = str(folder)
    if "://" not in folder:
        folder = os.path.abspath(folder)
    filesystem, path = pyarrow.fs.FileSystem.from_uri(folder)
    return filesystem, f"{path.rstrip('/')}/{name}"


def write_json(folder: str | os.PathLike, name: str, value: Any) -> None:
    """Write `folder/name` as JSON, whole or not at all (staged, then moved into place)."""
    filesystem, path = _file(folder, name)
    filesystem.create_dir(path.rpartition("/")[0], recursive=True)
    staged = f"{path}.tmp"
    with filesystem.open_output_stream(staged) as stream:
        stream.write(json.dumps(value, indent=1).encode())
    filesystem.move(staged, path)


def read_json(folder: str | os.PathLike, name: str, *, missing_ok: bool = False) -> Any:
    """What `write_json` wrote to `folder/name`; `None` for a missing file with `missing_ok`.

    Raises:
        FileNotFoundError: no such file (without `missing_ok`).
    """
    import pyarrow.fs

    filesystem, path = _file(folder, name)
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        if missing_ok:
            return None
        raise FileNotFoundError(f"no {name} in {folder}")
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read())


def write_search_state(folder: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write the state `--resume` needs into the search's Ray folder."""
    write_json(folder, SEARCH_STATE_FILE, state)


def read_search_state(folder: str | os.PathLike) -> dict[str, Any]:
    """The state `write_search_state` wrote.

    Raises:
        FileNotFoundError: `folder` is not the folder of a sora-tune search.
    """
    state = read_json(folder, SEARCH_STATE_FILE, missing_ok=True)
    if state is None:
        raise FileNotFoundError(
            f"{folder} is not a sora-tune search folder (no {SEARCH_STATE_FILE})"
        )
    return state
