"""The sweep storage (tune/storage.py): a local folder and an S3 URI (a local moto server) behave alike; folders are
published with their commit marker last and fetched whole, once per node."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest

from dilm import DilmError
from tune.storage import (
    ArrowStorage,
    LocalStorage,
    Staged,
    cached_folder,
    is_uri,
    join,
    open_storage,
    sync_down,
    sync_up,
)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    request.getfixturevalue("s3_env")
    return ArrowStorage(f"s3://dilm-test/{uuid.uuid4().hex[:8]}")


def make_folder(root: Path) -> Path:
    (root / "sets" / "dpc2").mkdir(parents=True)
    (root / "sets" / "dpc2" / "set00.jsonl").write_text('{"text": "a"}\n')
    (root / "checkpoint").mkdir()
    (root / "checkpoint" / "weights.pt").write_bytes(b"\0" * 10)
    (root / "final.json").write_text('{"objective": 50.0}\n')
    (root / "provenance.json").write_text("{}\n")
    return root


def test_join_keeps_a_uri_query_at_the_end():
    assert join("/data/sweeps", "sets", "s") == "/data/sweeps/sets/s"
    assert join("s3://b/dilm/", "lm", "k") == "s3://b/dilm/lm/k"
    assert join("s3://b/dilm?endpoint_override=h:9000&scheme=http", "tune", "x") == \
        "s3://b/dilm/tune/x?endpoint_override=h:9000&scheme=http"
    assert is_uri("gs://b") and not is_uri("/x")
    with pytest.raises(DilmError, match="unknown URI scheme 'ftp'"):
        open_storage("ftp://host/x")


def test_files_read_write_remove(store):
    store.write_json("state/s.json", {"a": 1})
    assert store.exists("state/s.json") and store.read_json("state/s.json") == {"a": 1}
    assert store.files() == ["state/s.json"] and store.files("nope") == []
    store.write_text("state/s.json", "2")  # replaced whole
    assert store.read_text("state/s.json") == "2"
    store.remove("state")
    assert not store.exists("state/s.json") and store.files() == []


def test_upload_puts_the_marker_last_and_download_is_whole(store, tmp_path, monkeypatch):
    src = make_folder(tmp_path / "src")
    order = []
    put = type(store).put_file
    monkeypatch.setattr(type(store), "put_file", lambda self, p, key: (order.append(key), put(self, p, key)))
    store.upload(src, "t1", last=["final.json"], skip=["checkpoint"])
    assert order[-1] == "t1/final.json" and not any("checkpoint" in k for k in order)
    assert store.files("t1") == ["final.json", "provenance.json", "sets/dpc2/set00.jsonl"]
    store.download("t1", tmp_path / "copy")
    assert sorted(p.relative_to(tmp_path / "copy").as_posix() for p in (tmp_path / "copy").rglob("*")
                  if p.is_file()) == store.files("t1")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_a_folder_is_fetched_once_per_node_and_built_once(s3_env, tmp_path):
    store = ArrowStorage(f"s3://dilm-test/{uuid.uuid4().hex[:8]}/lm")
    builds = []

    def build(out: Path) -> None:
        builds.append(out)
        out.mkdir(parents=True)
        (out / "weights").write_text("w")
        (out / "meta.json").write_text("{}")

    first = cached_folder(store, "key1", "meta.json", tmp_path / "node-a", build)
    assert first == tmp_path / "node-a" / "key1" and len(builds) == 1
    assert store.files("key1") == ["meta.json", "weights"]  # published
    again = cached_folder(store, "key1", "meta.json", tmp_path / "node-a", build)
    other = cached_folder(store, "key1", "meta.json", tmp_path / "node-b")  # another node fetches, never builds
    assert again == first and (other / "weights").read_text() == "w" and len(builds) == 1
    with pytest.raises(DilmError, match="holds no meta.json"):
        cached_folder(store, "missing", "meta.json", tmp_path / "node-b")


def test_staged_folder_is_published_and_dropped_locally(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("DILM_CACHE", str(tmp_path / "cache"))
    location = f"s3://dilm-test/{uuid.uuid4().hex[:8]}/sets/s"
    out = Staged(location, "trial_1")
    assert out.committed("final.json") is None and str(out.path).startswith(str(tmp_path / "cache"))
    make_folder(out.path)
    out.publish(last=["final.json"], skip=["checkpoint"])
    assert not out.path.exists() and out.committed("final.json") == {"objective": 50.0}
    local = Staged(str(tmp_path / "sets"), "trial_1")  # a local storage: written in place, nothing moves
    make_folder(local.path)
    local.publish(last=["final.json"])
    assert local.path == tmp_path / "sets" / "trial_1" and (local.path / "checkpoint").exists()


def test_driver_files_go_up_and_come_back(s3_env, tmp_path):
    store = ArrowStorage(f"s3://dilm-test/{uuid.uuid4().hex[:8]}")
    head = tmp_path / "head"
    (head / "state").mkdir(parents=True)
    (head / "state" / "s.json").write_text("{}")
    db = sqlite3.connect(head / "optuna.db")
    db.execute("create table t (x)")
    db.execute("insert into t values (1)")
    db.commit()  # left open, as the driver's storage engine leaves it
    sync_up(store, head, ["optuna.db", "state/s.json", "reports/s"])
    fresh = tmp_path / "fresh"
    assert sorted(sync_down(store, fresh, ["optuna.db", "state/s.json", "reports/s"])) == ["optuna.db", "state/s.json"]
    assert sqlite3.connect(fresh / "optuna.db").execute("select x from t").fetchall() == [(1,)]
    assert sync_down(store, fresh, ["optuna.db"]) == []  # present locally: kept
    db.close()
