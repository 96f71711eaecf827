"""A sweep's records in PostgreSQL (``--tracking-db URL`` / ``tracking_db:``, :mod:`tune.database`): a URL that
cannot be used is one line before Ray starts, its password is masked wherever it is written, and (slow) the smoke
sweep, SIGKILLed and resumed, keeps every MLflow run and Optuna trial in a real PostgreSQL server started for the
test (``initdb`` + ``pg_ctl`` in a temporary folder, as this user or, as root, as ``postgres`` or ``nobody``); and
(slow) a sweep whose PostgreSQL server is stopped and started again meanwhile ends as if nothing had happened."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.tune.test_sweep import SWEEPS, await_driver, crash_and_resume, driver, finished_trials, kill_tree, write_yaml
from tests.tune.test_sweep_errors import no_ray  # noqa: F401 (a fixture)
from tune.config import load_config
from tune.database import dashboard_url, masked, with_driver
from tune.sweep import main

PASSWORD = "pg-sentinel-5e1d"  # the tracking database's password: must reach no record of the sweep


def smoke(**change) -> dict:
    raw = yaml.safe_load((SWEEPS / "smoke.yaml").read_text())
    raw.update(name="crash", mlflow={"experiment": "dilm-test-pg"}, **change)
    raw["fixed"].update(outer_loops=1, lm_steps=4)
    return raw


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("url,says", [
    ("mysql://dilm:" + PASSWORD + "@127.0.0.1/db", "needs PostgreSQL"),
    ("postgresql+nosuchdriver://dilm:" + PASSWORD + "@127.0.0.1/db", "its driver is not installed"),
    ("no url at all", "not a SQLAlchemy URL"),
    (f"postgresql://dilm:{PASSWORD}@127.0.0.1:{free_port()}/db", "cannot use it"),  # nothing listens there
])
def test_a_tracking_db_that_cannot_be_used_is_one_line_before_ray(url, says, tmp_path, capsys, no_ray):  # noqa: F811
    config = write_yaml(tmp_path, smoke())
    assert main(["--config", str(config), "--storage", str(tmp_path / "s"), "--tracking-db", url]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("dilm sweep: error: ") and len(out.err.splitlines()) == 1 and says in out.err, out
    assert PASSWORD not in out.out + out.err and not (tmp_path / "s" / "tune").exists()


def test_a_tracking_db_beside_mlflow_tracking_uri_is_one_line(tmp_path, capsys, monkeypatch, no_ray):  # noqa: F811
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    config = write_yaml(tmp_path, smoke(tracking_db=f"postgresql://dilm:{PASSWORD}@127.0.0.1/db"))
    assert main(["--config", str(config), "--storage", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "both name an MLflow store" in err and len(err.splitlines()) == 1 and PASSWORD not in err, err


def test_the_yaml_key_is_read_and_saved_masked(tmp_path):
    url = f"postgresql://dilm:{PASSWORD}@db.example:5432/sweeps"
    cfg = load_config(write_yaml(tmp_path, smoke(tracking_db=url)))
    assert cfg.tracking_db == url and cfg.to_dict()["tracking_db"] == "postgresql://dilm:***@db.example:5432/sweeps"
    assert load_config(write_yaml(tmp_path, smoke()), tracking_db=url).tracking_db == url  # --tracking-db
    assert masked("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    assert with_driver(url) == f"postgresql+psycopg2://dilm:{PASSWORD}@db.example:5432/sweeps"  # not psycopg 3
    assert dashboard_url(with_driver(url)) == ("postgresql+psycopg2://dilm:***@db.example:5432/sweeps"
                                               "?options=-csearch_path%3Doptuna")  # the study's schema


def account(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def server_binary(name: str) -> str | None:
    """PostgreSQL's ``name`` on PATH, else in the newest of Debian's ``/usr/lib/postgresql/<version>/bin``."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    return str(versions[-1]) if versions else None


@pytest.fixture
def postgres(postgres_server):
    """The URL of :func:`postgres_server`."""
    return postgres_server.url


@pytest.fixture
def postgres_server():
    """A PostgreSQL server on a free port of 127.0.0.1, user ``dilm`` with :data:`PASSWORD`: its ``url``, ``stop()``
    (``pg_ctl stop -m immediate``: what a lost database host looks like to its clients) and ``start()`` (again, on
    the same port and data). Skipped in one line where none can be started (no server package, no unprivileged user
    to run it as root, initdb failing)."""
    initdb, pg_ctl = server_binary("initdb"), server_binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no initdb/pg_ctl (PostgreSQL's server package: make postgres): no tracking database to test")
    run_as = []
    if os.geteuid() == 0:  # initdb refuses root: the distribution's postgres user, else nobody
        user = next((u for u in map(account, ("postgres", "nobody")) if u), None)
        if user is None or not shutil.which("runuser"):
            pytest.skip("running as root with no unprivileged user (postgres, nobody) to run initdb as")
        run_as = ["runuser", "-u", user.pw_name, "--"]
    root = Path(tempfile.mkdtemp(prefix="dilm-pg-"))
    (root / "pw").write_text(PASSWORD)
    if run_as:
        for p in (root, root / "pw"):
            os.chown(p, user.pw_uid, user.pw_gid)
    port, data = free_port(), root / "data"
    start = [pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "start", "-o",
             f"-p {port} -k {root} -c listen_addresses=127.0.0.1"]
    stop = [pg_ctl, "-D", str(data), "-m", "immediate", "stop"]

    def pg(step: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([*run_as, *step], capture_output=True, text=True)

    try:
        for step in ([initdb, "-D", str(data), "-U", "dilm", "--auth=scram-sha-256", f"--pwfile={root / 'pw'}"], start):
            done = pg(step)
            if done.returncode != 0:
                said = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
                pytest.skip(f"PostgreSQL could not be started here ({Path(step[0]).name}: {said})")
        yield SimpleNamespace(url=f"postgresql://dilm:{PASSWORD}@127.0.0.1:{port}/postgres", start=lambda: pg(start),
                              stop=lambda: pg(stop))
    finally:
        pg(stop)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_a_sweep_in_postgresql_resumes_and_keeps_its_records_there(postgres, tmp_path):
    """The smoke sweep with ``--tracking-db``, SIGKILLed once a trial has finished, then ``--resume``: the parent
    run, one child run per trial (FINISHED, its objective) and the study's trials (COMPLETE, the same values) are in
    PostgreSQL — MLflow in the default schema, Optuna in ``optuna`` — no sqlite file is made, finished trials are not
    run again, and the password is in no file of the storage, no log, no MLflow param or tag, and not in Tune's
    pickled searcher."""
    import optuna
    import sqlalchemy

    from tune.database import study_storage

    storage = tmp_path / "storage"
    storage.mkdir()
    started = time.monotonic()
    run = crash_and_resume(storage, write_yaml(storage, smoke()), extra=("--tracking-db", postgres))
    assert run["rc"] == 0 and "sweep crash: 3 complete" in run["out"], run["out"][-3000:]
    wall, before = time.monotonic() - started, run["before"]

    after = finished_trials(storage)
    assert len(after) == 3 and all(after[t] == m for t, m in before.items())  # not run again
    assert not list(storage.rglob("*.db"))  # neither mlflow.db nor optuna.db: the records are in PostgreSQL
    objectives = {t: json.loads((storage / "sets" / "crash" / t / "final.json").read_text())["objective"]
                  for t in after}
    engine = sqlalchemy.create_engine(with_driver(postgres))
    with engine.connect() as db:
        q = lambda sql, **kw: db.execute(sqlalchemy.text(sql), kw).fetchall()  # noqa: E731
        parents = q("select r.run_uuid from runs r join tags g on g.run_uuid = r.run_uuid where g.key = 'dilm.sweep' "
                    "and g.value = 'crash' and r.run_uuid not in (select run_uuid from tags where key = "
                    "'mlflow.parentRunId')")
        assert len(parents) == 1  # the resume continued the parent run
        for t, objective in objectives.items():
            [(run, status)] = q("select r.run_uuid, r.status from runs r join tags g on g.run_uuid = r.run_uuid "
                                "where g.key = 'dilm.trial_id' and g.value = :t", t=t)
            [(logged,)] = q("select value from latest_metrics where run_uuid = :r and key = 'objective'", r=run)
            assert status == "FINISHED" and logged == pytest.approx(objective)
        values = [v for (v,) in q("select value from params union all select value from tags")]
        assert "postgresql://dilm:***@" in " ".join(map(str, values))  # the parent run's tracking_db param, masked
        assert not [v for v in values if PASSWORD in str(v)]
        schemas = dict(q("select table_name, table_schema from information_schema.tables where table_name in "
                         "('runs', 'trials')"))
    engine.dispose()
    assert schemas == {"runs": "public", "trials": "optuna"}
    study = optuna.load_study(study_name="crash", storage=study_storage(with_driver(postgres)))
    by_ray_id = {t.user_attrs.get("ray_trial_id"): t for t in study.trials}
    for t, objective in objectives.items():
        assert by_ray_id[t].state.name == "COMPLETE" and by_ray_id[t].value == pytest.approx(objective)

    leaked = [str(p) for p in storage.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]
    assert not leaked  # Tune's tuner.pkl and searcher state, state/, the server's log, the drivers' consoles
    print(f"sweep in PostgreSQL, killed and resumed: {wall:.0f} s, {len(before)} trial(s) finished before the kill")


@pytest.mark.slow
def test_a_tracking_db_down_for_a_while_mid_sweep_costs_nothing(postgres_server, tmp_path):
    """The smoke sweep with ``--tracking-db``, its PostgreSQL server stopped once a trial has finished and started
    again 20 s later: the tracking server answers the trials 503 meanwhile, MLflow's client retries them, the driver's
    Optuna storage opens new connections (``pool_pre_ping``: its pooled ones were closed by the restart), and the
    sweep ends with every run and trial in PostgreSQL as if nothing had happened."""
    import optuna
    import sqlalchemy

    from tune.database import study_storage

    storage = tmp_path / "storage"
    storage.mkdir()
    proc = driver(write_yaml(storage, smoke()), storage, storage / "driver.log", "--tracking-db", postgres_server.url)
    try:
        await_driver(proc, storage / "driver.log", lambda: finished_trials(storage), "no trial finished")
        assert postgres_server.stop().returncode == 0
        time.sleep(20)
        assert postgres_server.start().returncode == 0
        proc.wait(timeout=480)
    finally:
        kill_tree(proc)
    out = (storage / "driver.log").read_text()
    refused = (storage / "mlflow-server.log").read_text().count("503 Service Unavailable")
    print(f"\nrc {proc.returncode}; the tracking server answered 503 {refused} times\n" + out[-3000:])
    assert proc.returncode == 0 and "sweep crash: 3 complete" in out, out[-3000:]
    assert refused > 0  # the trials met the outage
    study = optuna.load_study(study_name="crash", storage=study_storage(with_driver(postgres_server.url)))
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 3
    engine = sqlalchemy.create_engine(with_driver(postgres_server.url))
    with engine.connect() as db:
        statuses = db.execute(sqlalchemy.text("select r.status from runs r join tags g on g.run_uuid = r.run_uuid "
                                              "where g.key = 'dilm.trial_id'")).scalars().all()
    engine.dispose()
    assert statuses == ["FINISHED"] * 3  # one child run per trial
