"""Atomic writes: outputs appear complete or not at all (temp path, then rename)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hpedge.errors import HpedgeError


def check_parent(path: Path) -> None:
    """Create the parent folder if needed; a clear error when the location is not writable."""
    parent = path.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HpedgeError(f"cannot write {path}: cannot create folder {parent} ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise HpedgeError(f"cannot write {path}: folder {parent} is not writable")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; renamed onto ``path`` when the block succeeds."""
    path = Path(path)
    check_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary folder next to ``path``; it replaces ``path`` only when the block succeeds."""
    path = Path(path)
    check_parent(path)
    if path.exists() and not overwrite:
        raise HpedgeError(f"{path} already exists; pass --overwrite to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.resolve().parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
