"""Where a sweep's driver and its trials share files: a local folder (or shared mount), or any URI that
``pyarrow.fs.FileSystem.from_uri`` opens (``s3://``, ``gs://``, ``hdfs://``, ... — what Ray Tune's ``storage_path``
accepts), so that trials on nodes without a shared filesystem lose nothing.

Vocabulary
  * **location** — an absolute path (``/data/sweeps``) or a URI (``s3://bucket/dilm``; an S3-compatible server
    through ``$AWS_ENDPOINT_URL`` or ``?endpoint_override=host:9000&scheme=http``). A plain string: this is what the
    driver hands to trials (never a file system object, never a path only the driver's machine has).
  * **key** — a relative ``/``-separated path under a location (``<trial_id>/final.json``).
  * **commit marker** — the file of a folder written last (a trial's ``final.json``, an LM checkpoint's
    ``dilm_lm.json``): a reader that finds it finds every other file of the folder whole.
  * **node cache** — ``$DILM_CACHE/storage`` (``~/.cache/dilm/storage``): per machine, what a node fetched (LM
    checkpoints, by cache key) and what it writes before publishing (``staging/``).

Atomicity. :class:`LocalStorage` writes a file to a temporary name and renames it (:mod:`dilm.files`).
:class:`ArrowStorage` uploads a file to a temporary key beside its target and moves it there (S3 has no rename: the
move is a copy, so the final key appears whole or not at all); a folder goes up file by file, its commit marker
last. Downloads land in a temporary folder renamed into place. Two nodes publishing the same folder at once (two
first trials of one LM config) both upload a whole, equivalent copy; readers wait for the marker.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

from dilm import DilmError
from dilm.files import atomic_path, atomic_write_dir, atomic_write_text, cache_dir, file_lock, write_json
from dilm.readers import is_uri

# what pyarrow.fs.FileSystem.from_uri opens (pyarrow 25); a URI of another scheme is refused when the YAML is read
SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")


def check_location(location: str, what: str) -> None:
    """A one-line DilmError for a URI whose scheme no pyarrow file system opens."""
    scheme = str(location).split("://", 1)[0]
    if is_uri(location) and scheme not in SCHEMES:
        raise DilmError(f"{what} {location!r}: unknown URI scheme {scheme!r}; known: {', '.join(SCHEMES)} (or a "
                        "local folder)")


def join(location: str | Path, *parts: str) -> str:
    """``location`` with ``parts`` appended to its path (a URI keeps its ``?query`` at the end)."""
    parts = tuple(p.strip("/") for p in parts if p and p.strip("/"))
    if not is_uri(location):
        return str(Path(location, *parts))
    base, sep, query = str(location).partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def split(location: str) -> tuple[str, str]:
    """``(parent, name)`` of a location: ``join(parent, name) == location``."""
    base, sep, query = str(location).partition("?")
    parent, _, name = base.rstrip("/").rpartition("/")
    return parent + sep + query, name


def node_cache(*parts: str) -> Path:
    return cache_dir().joinpath("storage", *parts)


def slug(location: str) -> str:
    """A folder name for ``location`` (readable, unique by a hash of the whole string)."""
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in location.split("?")[0])[-60:].strip("_")
    return f"{readable}-{hashlib.sha256(location.encode()).hexdigest()[:10]}"


class Storage:
    """Files under one location, by key. ``local`` is the folder when the location is one (else ``None``)."""

    location: str
    local: Path | None = None

    def uri(self, key: str = "") -> str:
        return join(self.location, key)

    def child(self, *parts: str) -> Storage:
        return open_storage(join(self.location, *parts))

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def read_text(self, key: str) -> str:
        raise NotImplementedError

    def write_text(self, key: str, text: str) -> None:
        raise NotImplementedError

    def files(self, key: str = "") -> list[str]:
        """Every file under folder ``key``, as keys relative to it, sorted ([] when there is none)."""
        raise NotImplementedError

    def upload(self, src: Path, key: str = "", last: Iterable[str] = (), skip: Iterable[str] = ()) -> None:
        """The files of local folder ``src`` to folder ``key``, the relative paths in ``last`` last (in that order);
        top-level names in ``skip`` stay behind."""
        raise NotImplementedError

    def download(self, key: str, dest: Path) -> None:
        """Folder ``key`` to local folder ``dest``, swapped in whole."""
        raise NotImplementedError

    def put_file(self, src: Path, key: str) -> None:
        """One local file to ``key``, atomically."""
        raise NotImplementedError

    def get_file(self, key: str, dest: Path) -> None:
        """File ``key`` to local file ``dest``, renamed into place."""
        raise NotImplementedError

    def remove(self, key: str) -> None:
        """A file or folder, if there."""
        raise NotImplementedError

    def read_json(self, key: str):
        return json.loads(self.read_text(key))

    def write_json(self, key: str, obj) -> None:
        self.write_text(key, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _ordered(src: Path, last: Iterable[str], skip: Iterable[str]) -> list[str]:
    """The relative paths of ``src``'s files, those in ``last`` at the end, top-level names in ``skip`` left out."""
    skip, last = set(skip), list(last)
    rel = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    rel = [r for r in rel if r.split("/", 1)[0] not in skip]
    return [r for r in rel if r not in last] + [r for r in last if r in rel]


class LocalStorage(Storage):
    """A folder of this machine (or a shared mount): today's behaviour, writes renamed into place."""

    def __init__(self, root: str | Path):
        self.local = Path(root)
        self.location = str(self.local)

    def exists(self, key: str) -> bool:
        return (self.local / key).exists()

    def read_text(self, key: str) -> str:
        return (self.local / key).read_text()

    def write_text(self, key: str, text: str) -> None:
        atomic_write_text(self.local / key, text)

    def write_json(self, key: str, obj) -> None:
        write_json(self.local / key, obj)

    def files(self, key: str = "") -> list[str]:
        root = self.local / key
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.is_dir() else []

    def upload(self, src: Path, key: str = "", last: Iterable[str] = (), skip: Iterable[str] = ()) -> None:
        dest = self.local / key
        if Path(src).resolve() == dest.resolve():  # written in place already
            return
        for rel in _ordered(Path(src), last, skip):
            self.put_file(Path(src) / rel, f"{key}/{rel}" if key else rel)

    def download(self, key: str, dest: Path) -> None:
        if (self.local / key).resolve() != Path(dest).resolve():
            atomic_write_dir(dest, lambda tmp: shutil.copytree(self.local / key, tmp, dirs_exist_ok=True))

    def put_file(self, src: Path, key: str) -> None:
        target = self.local / key
        if Path(src).resolve() != target.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)

    def get_file(self, key: str, dest: Path) -> None:
        with atomic_path(dest) as tmp:
            shutil.copyfile(self.local / key, tmp)

    def remove(self, key: str) -> None:
        path = self.local / key
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


class ArrowStorage(Storage):
    """A URI opened with ``pyarrow.fs.FileSystem.from_uri``; keys are paths under the URI's path."""

    def __init__(self, location: str):
        import pyarrow.fs

        self.location = location
        try:
            self.fs, self.base = pyarrow.fs.FileSystem.from_uri(location)
        except (ValueError, OSError) as e:  # ArrowInvalid is a ValueError
            raise DilmError(f"cannot open storage {location!r}: {e}") from None
        self.base = self.base.rstrip("/")

    def _path(self, key: str) -> str:
        return str(PurePosixPath(self.base, key)) if key else self.base

    def _info(self, key: str):
        return self.fs.get_file_info(self._path(key))

    def exists(self, key: str) -> bool:
        import pyarrow.fs

        return self._info(key).type != pyarrow.fs.FileType.NotFound

    def read_text(self, key: str) -> str:
        with self.fs.open_input_stream(self._path(key)) as f:
            return f.read().decode()

    def _put(self, key: str, write: Callable) -> None:
        """Write to a temporary key beside ``key``, then move it there (see the module docstring)."""
        path = self._path(key)
        parent, name = path.rsplit("/", 1)
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with self.fs.open_output_stream(tmp) as out:
                write(out)
            self.fs.move(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                self.fs.delete_file(tmp)
            raise

    def write_text(self, key: str, text: str) -> None:
        self._put(key, lambda out: out.write(text.encode()))

    def files(self, key: str = "") -> list[str]:
        import pyarrow.fs

        root = self._path(key)
        selector = pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True)
        return sorted(i.path[len(root) + 1:] for i in self.fs.get_file_info(selector)
                      if i.type == pyarrow.fs.FileType.File and not i.base_name.endswith(".tmp"))

    def upload(self, src: Path, key: str = "", last: Iterable[str] = (), skip: Iterable[str] = ()) -> None:
        for rel in _ordered(Path(src), last, skip):
            self.put_file(Path(src) / rel, f"{key}/{rel}" if key else rel)

    def put_file(self, src: Path, key: str) -> None:
        with open(src, "rb") as f:
            self._put(key, lambda out: shutil.copyfileobj(f, out, 1 << 20))

    def _copy_to(self, key: str, target: Path) -> None:
        with self.fs.open_input_stream(self._path(key)) as f, open(target, "wb") as out:
            shutil.copyfileobj(f, out, 1 << 20)

    def get_file(self, key: str, dest: Path) -> None:
        with atomic_path(dest) as tmp:
            self._copy_to(key, tmp)

    def download(self, key: str, dest: Path) -> None:
        def fill(tmp: Path) -> None:
            for rel in self.files(key):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                self._copy_to(f"{key}/{rel}" if key else rel, tmp / rel)

        atomic_write_dir(dest, fill)

    def remove(self, key: str) -> None:
        import pyarrow.fs

        kind = self._info(key).type
        if kind == pyarrow.fs.FileType.Directory:
            self.fs.delete_dir(self._path(key))
        elif kind == pyarrow.fs.FileType.File:
            self.fs.delete_file(self._path(key))


@functools.lru_cache(maxsize=64)
def open_storage(location: str | Path) -> Storage:
    """The storage at ``location``: a URI through pyarrow, else a local folder."""
    location = str(location)
    check_location(location, "storage")
    return ArrowStorage(location) if is_uri(location) and not location.startswith("file://") \
        else LocalStorage(location.removeprefix("file://"))


def cached_folder(store: Storage, key: str, marker: str, cache: Path,
                  build: Callable[[Path], object] | None = None) -> Path:
    """A node-local copy of folder ``key`` of ``store`` (one holding ``marker``): ``cache / key``, fetched once per
    node (a file lock: concurrent callers wait for the first). When the storage has none yet, ``build(path)`` makes
    it locally (atomically) and it is published, ``marker`` last; without ``build`` that is an error. A local
    storage is read in place."""
    if store.local is not None:
        if build is not None and not (store.local / key / marker).exists():
            build(store.local / key)
        return store.local / key
    local = cache / key
    with file_lock(cache / f".{key}.fetch.lock"):
        if not (local / marker).exists() and store.exists(f"{key}/{marker}"):
            store.download(key, local)
        if not (local / marker).exists():
            if build is None:
                raise DilmError(f"{store.uri(key)} holds no {marker}")
            build(local)
        if not store.exists(f"{key}/{marker}"):
            store.upload(local, key, last=[marker])
    return local


class Staged:
    """A folder that a process writes locally and publishes to ``key`` of a storage: in place for a local storage;
    for a URI in the node cache's ``staging/`` (a retried trial on the same node finds its checkpoint there),
    uploaded by :meth:`publish` with the commit marker last, then dropped locally."""

    def __init__(self, location: str, key: str):
        self.store = open_storage(location)
        self.key = key
        self.path = (self.store.local / key if self.store.local is not None
                     else node_cache("staging", slug(location), key))

    @property
    def uri(self) -> str:
        return self.store.uri(self.key)

    def committed(self, marker: str):
        """The JSON of ``marker`` when the folder has been published, else ``None``."""
        return self.store.read_json(f"{self.key}/{marker}") if self.store.exists(f"{self.key}/{marker}") else None

    def publish(self, last: Iterable[str] = (), skip: Iterable[str] = ()) -> None:
        self.store.upload(self.path, self.key, last=last, skip=skip)
        if self.store.local is None:
            shutil.rmtree(self.path, ignore_errors=True)


# --------------------------------------------------------------------------- the driver's own files


def snapshot_sqlite(db: Path, dest: Path) -> Path:
    """A consistent copy of a sqlite database that may be open (sqlite's online backup), for upload."""
    import sqlite3

    dest.parent.mkdir(parents=True, exist_ok=True)
    src, out = sqlite3.connect(db), sqlite3.connect(dest)
    try:
        src.backup(out)
    finally:
        out.close()
        src.close()
    return dest


def sync_up(store: Storage, local: Path, keys: Iterable[str]) -> None:
    """Upload the driver's files ``keys`` (files or folders under ``local``) to ``store``; a sqlite database through a
    snapshot. A no-op for a local storage (``local`` is the storage)."""
    if store.local is not None:
        return
    for key in keys:
        path = local / key
        if path.is_dir():
            store.upload(path, key)
        elif path.suffix == ".db" and path.exists():
            snap = snapshot_sqlite(path, local / ".upload" / path.name)
            store.put_file(snap, key)
            snap.unlink()
        elif path.exists():
            store.put_file(path, key)


def sync_down(store: Storage, local: Path, keys: Iterable[str]) -> list[str]:
    """Fetch the driver's files ``keys`` that ``store`` has and ``local`` lacks (a resume on a fresh head); returns
    those fetched."""
    if store.local is not None:
        return []
    fetched = []
    for key in keys:
        path = local / key
        if path.exists():
            continue
        if store.files(key):
            store.download(key, path)
        elif store.exists(key):
            store.get_file(key, path)
        else:
            continue
        fetched.append(key)
    return fetched
