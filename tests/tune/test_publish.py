"""The driver's files published as the sweep goes (tune/publish.py): a consistent copy of each database, only what
changed, the marker last; a storage that goes away for a while costs one warning line and a retry, never a
half-written file."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tune.publish import Publisher
from tune.storage import LocalStorage, open_storage


class Trial:
    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def driver_folder(root: Path) -> Path:
    local = root / "mirror"
    (local / "mlartifacts" / "1").mkdir(parents=True)
    (local / "mlartifacts" / "1" / "a.json").write_text("{}")
    (local / "state").mkdir()
    (local / "state" / "s.json").write_text('{"parent_run_id": "p"}')
    db = sqlite3.connect(local / "optuna.db")
    db.execute("create table trials (id integer, state text)")
    db.commit()
    db.close()
    return local


KEYS = ["optuna.db", "mlflow.db", "state/s.json", "reports/s", "mlartifacts"]


class Counting(LocalStorage):
    def __init__(self, root, fail: bool = False):
        super().__init__(root)
        self.puts: list[str] = []
        self.fail = fail

    def put_file(self, src, key):
        if self.fail:
            raise OSError("connection refused")
        self.puts.append(key)
        super().put_file(src, key)

    def write_text(self, key, text):
        if self.fail:
            raise OSError("connection refused")
        super().write_text(key, text)


def test_a_trial_end_publishes_what_changed_with_a_consistent_database_copy(tmp_path):
    local = driver_folder(tmp_path)
    store = Counting(tmp_path / "remote")
    pub = Publisher(store, local, KEYS, "state/s.published.json", every_s=3600)
    writer = sqlite3.connect(local / "optuna.db")  # open, as Optuna's is while the sweep runs
    writer.execute("insert into trials values (0, 'COMPLETE')")
    writer.commit()
    assert pub.publish() and sorted(store.puts) == ["mlartifacts/1/a.json", "optuna.db", "state/s.json"]
    pub.on_step_end(0, [])  # nothing ended, not yet due: no upload
    assert len(store.puts) == 3

    writer.execute("insert into trials values (1, 'RUNNING')")
    writer.commit()
    writer.execute("begin")
    writer.execute("insert into trials values (2, 'UNCOMMITTED')")  # a transaction in flight is not copied
    pub.on_trial_complete(0, [], Trial("t1"))
    pub.on_step_end(1, [])
    assert store.puts[3:] == ["optuna.db"]  # only the database changed
    copy = sqlite3.connect(tmp_path / "remote" / "optuna.db")
    assert copy.execute("select id, state from trials order by id").fetchall() == [(0, "COMPLETE"), (1, "RUNNING")]
    marker = json.loads((tmp_path / "remote" / "state" / "s.published.json").read_text())
    assert marker["trials_ended"] == ["t1"] and marker["published_at"]
    writer.rollback()
    assert not list((tmp_path / "remote").rglob(".*"))  # no temporary file left


def test_an_unreachable_storage_is_one_warning_then_retried_with_backoff(tmp_path, capsys):
    local = driver_folder(tmp_path)
    store = Counting(tmp_path / "remote", fail=True)
    pub = Publisher(store, local, KEYS, "state/s.published.json", every_s=60)
    pub.on_trial_error(0, [], Trial("t0"))
    pub.on_step_end(0, [])
    pub.publish()  # a second failure says nothing more
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not publish" in err and "connection refused" in err
    tries = pub._next_try
    pub.on_step_end(1, [])  # within the backoff: not tried
    assert pub._next_try == tries and not (tmp_path / "remote").exists()
    store.fail = False
    pub._next_try = 0  # the backoff has passed
    pub.on_step_end(2, [])  # still due: the trial's end was never published
    assert "published to" in capsys.readouterr().err
    assert json.loads((tmp_path / "remote" / "state" / "s.published.json").read_text())["trials_ended"] == ["t0"]


@pytest.mark.integration
def test_an_s3_server_that_stops_and_comes_back(tmp_path, monkeypatch, capsys):
    """moto stopped mid-sweep: the publish fails in one line and leaves the last whole copy; restarted on the same
    port, the next publish completes it (no temporary key left behind)."""
    from moto.server import ThreadedMotoServer

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        import boto3

        boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1").create_bucket(Bucket="pub")
        store = open_storage(f"s3://pub/sweeps?endpoint_override={host}:{port}&scheme=http")
        local = driver_folder(tmp_path)
        pub = Publisher(store, local, KEYS, "state/s.published.json", every_s=60)
        assert pub.publish()
        server.stop()
        (local / "mlartifacts" / "1" / "b.json").write_text('{"b": 1}')
        pub.on_trial_complete(0, [], Trial("t1"))
        assert not pub.publish()
        assert capsys.readouterr().err.count("could not publish") == 1
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        assert pub.publish()
        assert store.files() == ["mlartifacts/1/a.json", "mlartifacts/1/b.json", "optuna.db", "state/s.json",
                                 "state/s.published.json"]
        assert json.loads(store.read_text("state/s.published.json"))["trials_ended"] == ["t1"]
    finally:
        server.stop()


@pytest.mark.parametrize("restore", [False, True])
def test_the_publisher_is_attached_after_the_tuner_saved_itself(restore):
    """Never pickled with the experiment (a restored Tuner gets this run's, in place of any other)."""
    from types import SimpleNamespace

    from tune.publish import attach

    old = Publisher(LocalStorage("/nonexistent"), Path("/x"), [], "m")
    run_config = SimpleNamespace(callbacks=["trial_end", old] if restore else ["trial_end"])
    tuner = SimpleNamespace(_local_tuner=SimpleNamespace(_run_config=run_config))
    new = Publisher(LocalStorage("/nonexistent"), Path("/y"), [], "m")
    attach(tuner, new)
    assert run_config.callbacks == ["trial_end", new]
