"""Files written atomically: to a temporary name in the target's folder, then renamed into place, so that a killed
run never leaves half a file (or half a checkpoint folder) where a reader expects a whole one; and where cached files
live (:func:`cache_dir`, ``$DILM_CACHE``)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """Where dilm caches what it computes or fetches once: ``$DILM_CACHE``, else ``~/.cache/dilm``."""
    return Path(os.environ.get("DILM_CACHE", Path.home() / ".cache" / "dilm"))


def keyed_cache_path(kind: str, key: str, suffix: str = ".json") -> Path:
    """``<cache dir>/<kind>/<hash><suffix>``: where a cached result lives, named by the hash of ``key`` (everything
    the result comes from, serialised)."""
    return cache_dir() / kind / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}{suffix}"


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


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock on the file ``path`` (made if missing) for the block: processes that ask wait in turn."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def made_once(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``path``, written by ``write(tmp)`` (a temporary file beside it, renamed into place) unless it is there
    already; processes that ask together wait on a lock file beside it, and the first one writes it."""
    path = Path(path)
    if not path.exists():
        with file_lock(path.with_suffix(".lock")):
            if not path.exists():
                with atomic_path(path) as tmp:
                    write(tmp)
    return path


def json_made_once(path: str | Path, compute: Callable[[], object]):
    """The JSON value kept at ``path``: ``compute()``'s, written once (:func:`made_once`), read back by every caller."""
    return json.loads(made_once(path, lambda tmp: Path(tmp).write_text(json.dumps(compute()))).read_text())


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
