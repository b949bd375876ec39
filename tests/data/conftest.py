"""Fixtures for the data tests: GLUE folders written byte for byte.

The ``tokenizer`` fixture (the packaged MiniLM tokenizer, offline) comes from tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def glue_dir(tmp_path: Path) -> Path:
    return tmp_path / "glue"


@pytest.fixture
def write_task(glue_dir: Path) -> Callable[..., Path]:
    """Write ``<glue_dir>/<folder>/<name>`` for each ``name=content`` (``str`` or raw ``bytes``)."""

    def write(folder: str, **files: str | bytes) -> Path:
        task_dir = glue_dir / folder
        task_dir.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            (task_dir / f"{name}.tsv").write_bytes(data)
        return task_dir

    return write
