"""Files written atomically: to a temporary name in the target's folder, then renamed into place, so that a killed
run never leaves half a file (or half a checkpoint folder) where a reader expects a whole one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the caller to write; renamed to ``path`` when the block succeeds,
    removed when it fails. The suffix is kept (writers such as matplotlib choose the format by it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_dir(path: str | Path, fill: Callable[[Path], None], replace: bool = True) -> bool:
    """Build a folder with ``fill(tmp_dir)`` beside ``path``, then swap it in.

    With ``replace`` an existing folder is renamed aside, the new one renamed in, and the old one deleted (a
    reader sees the old folder or the new one, never a mix). Without, an existing folder wins (another process
    built it first) and the new one is discarded. Returns whether the new folder was put in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists() and not replace:
        shutil.rmtree(tmp)
        return False
    old = path.with_name(f".{path.name}-old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return True
