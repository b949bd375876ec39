"""The state `--resume` needs, beside Ray's experiment state: the search's settings and its
MLflow parent run. Read and written through pyarrow's file systems, as Ray resolves its storage:
a local or NFS folder, or a URI such as s3://bucket/path or gs://bucket/path."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow.fs

SEARCH_STATE_FILE = "sora_tune_search.json"


def _state_file(folder: str | os.PathLike) -> tuple[pyarrow.fs.FileSystem, str]:
    import pyarrow.fs

    folder = str(folder)
    if "://" not in folder:
        folder = os.path.abspath(folder)
    filesystem, path = pyarrow.fs.FileSystem.from_uri(folder)
    return filesystem, f"{path.rstrip('/')}/{SEARCH_STATE_FILE}"


def write_search_state(folder: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write the state `--resume` needs into the search's Ray folder, whole or not at all."""
    filesystem, path = _state_file(folder)
    filesystem.create_dir(path.rpartition("/")[0], recursive=True)
    staged = f"{path}.tmp"
    with filesystem.open_output_stream(staged) as stream:
        stream.write(json.dumps(state, indent=1).encode())
    filesystem.move(staged, path)


def read_search_state(folder: str | os.PathLike) -> dict[str, Any]:
    """The state `write_search_state` wrote.

    Raises:
        FileNotFoundError: `folder` is not the folder of a sora-tune search.
    """
    import pyarrow.fs

    filesystem, path = _state_file(folder)
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        raise FileNotFoundError(
            f"{folder} is not a sora-tune search folder (no {SEARCH_STATE_FILE})"
        )
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read())
