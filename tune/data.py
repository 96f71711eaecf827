"""The sweep's task as its trials read it: pinned to the content hash the driver read (every node checks it), and,
when the storage is a URI, its user files copied to the storage (``<storage>/data/<hash>/``) so that trials on other
nodes fetch them by URI (once per node: :func:`dilm.readers.local_copy`), never by a path of the driver's machine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dilm import DilmError
from dilm.readers import is_uri
from dilm.tasks import TaskData, TaskSpec, load_task, pin
from tune.config import SweepConfig
from tune.paths import SweepPaths
from tune.storage import join, open_storage


def pinned_task(cfg: SweepConfig) -> tuple[SweepConfig, TaskData]:
    """``cfg`` with its task pinned to the data's content hash (a resumed sweep whose data changed then differs from
    the one saved), and the data, read once in the driver."""
    data = load_task(cfg.task)
    return dataclasses.replace(cfg, task=pin(data)), data


def published(spec: TaskSpec, paths: SweepPaths) -> TaskSpec:
    """``spec`` as trials on any node read it: unchanged with a local storage; with a URI one, its local files
    uploaded once (by content hash) and named by URI."""
    if not paths.remote:
        return spec
    if spec.source == "disk":
        raise DilmError(f"task {spec.name}: a dataset saved on disk ({spec.dataset}) cannot reach trials through "
                        f"storage {paths.location}: write it as Parquet files (train/test) and give those")
    if spec.source != "files":
        return spec
    store = open_storage(join(paths.location, "data", spec.sha256[:16]))
    moved = {}
    for split in ("train", "test"):
        location = getattr(spec, split)
        if location and not is_uri(location):
            key = f"{split}-{Path(location).name}"
            if not store.exists(key):
                store.put_file(Path(location), key)
            moved[split] = store.uri(key)
    return dataclasses.replace(spec, **moved)
