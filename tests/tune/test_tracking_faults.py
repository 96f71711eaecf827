"""The sweep's tracking stores lost mid-sweep (docs/clusters.md, "What a fault costs"), on the real local Ray cluster
with the smoke sweep:

* the tracking server the driver serves to trials (``--autoscaling``: the driver serves MLflow, authenticated, as
  for a cluster whose nodes come and go) SIGKILLed, its whole process group, while trials are running: the driver's
  watch starts it again, the trials' requests made meanwhile are retried, the sweep ends as if nothing had happened;
* the tracking database (``--tracking-db``, a real PostgreSQL) gone for longer than the driver waits for it
  (``$DILM_TRACKING_DB_WAIT_S``, :mod:`tune.database`): one line naming the database, its password masked, and a
  sweep that ``--resume`` continues once the database is back. Fast: the retries themselves, on a fake clock.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from sqlalchemy.exc import IntegrityError, OperationalError

import tune.database
from dilm import DilmError
from tests.tune.test_sweep import SWEEPS, driver, finished_trials, kill_tree, write_yaml
from tests.tune.test_tracking_db import PASSWORD, postgres_server, smoke  # noqa: F401 (a fixture)
from tests.tune.test_trial_killed import checkpoint_state
from tune.database import WAIT_ENV, DatabaseDown, gone, retry, wait_s
from tune.report import trial_state
from tune.scores import FINAL, OBJECTIVE

NAME, EXPERIMENT = "smoke", "dilm-smoke"
RESTARTED = "warning: the MLflow server stopped; restarted on http://"


def tracking_server(driver_pid: int, storage: Path) -> psutil.Process | None:
    """The ``mlflow server`` the driver started for ``storage`` (the leader of its own process group)."""
    with contextlib.suppress(psutil.Error):
        for p in psutil.Process(driver_pid).children():
            cmd = p.cmdline()
            if "mlflow" in cmd and "server" in cmd and str(storage / "mlartifacts") in cmd:
                return p
    return None


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def kill_server_mid_trials(proc, storage: Path, deadline: float) -> dict:
    """Once a trial has checkpointed its first outer loop (it is logging its steps) and none has finished: SIGKILL
    the tracking server's process group; then wait for the restarted server to answer. Returns when each happened."""
    sets = storage / "sets" / NAME
    while True:
        assert proc.poll() is None, (storage / "driver.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial reached its first checkpoint in time"
        running = [d for d in sets.glob("*") if checkpoint_state(d).get("outer", 0) >= 1]
        if running and not list(sets.glob("*/final.json")):
            break
        time.sleep(0.2)
    server = tracking_server(proc.pid, storage)
    assert server is not None and os.getpgid(server.pid) == server.pid
    said = re.search(r"with the password in (\S+) \(", (storage / "driver.log").read_text())
    assert said, "the driver did not say where its login is"
    url = dict(line.split("=", 1) for line in Path(said[1]).read_text().splitlines())["url"]
    assert healthy(url)
    killed_at = time.time()
    os.killpg(server.pid, signal.SIGKILL)  # the server and its uvicorn worker: kill -9, the OOM killer
    while healthy(url):
        time.sleep(0.05)
    while not healthy(url):
        assert proc.poll() is None and time.monotonic() < deadline, "the tracking server was not restarted"
        time.sleep(0.2)
    return {"killed_at": killed_at, "back_at": time.time(), "pid": server.pid, "url": url,
            "running": sorted(d.name for d in running)}


@pytest.mark.slow  # ~4 min (5 on busy cores): the smoke sweep with a served, authenticated store
def test_the_tracking_server_killed_mid_sweep_is_restarted_and_nothing_is_lost(tmp_path):
    from mlflow.tracking import MlflowClient

    storage = tmp_path / "sweeps"
    storage.mkdir()
    raw = yaml.safe_load((SWEEPS / "smoke.yaml").read_text())
    raw["asha"]["grace_period"] = 50  # no trial stopped early: each ends with its objective
    started = time.monotonic()
    proc = driver(write_yaml(storage, raw, "smoke.yaml"), storage, storage / "driver.log", "--autoscaling")
    try:
        kill = kill_server_mid_trials(proc, storage, started + 600)
        proc.wait(timeout=max(60.0, started + 840 - time.monotonic()))
    finally:
        kill_tree(proc)
    out = (storage / "driver.log").read_text()

    # what the user sees: one line saying the server was restarted, then the sweep as usual
    assert proc.returncode == 0, out[-3000:]
    assert f"sweep {NAME}: MLflow UI http://" in out  # served: the trials logged through it
    assert [line for line in out.splitlines() if "MLflow server stopped" in line] == [RESTARTED + kill["url"][7:]]
    assert f"sweep {NAME}: 3 complete, 0 stopped early (ASHA), 0 failed" in out, out[-3000:]
    assert "Traceback" not in out, out[-5000:]

    # the records: one parent run and one child run per trial, FINISHED with its objective, nothing logged twice
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags and "baseline" not in r.data.tags]
    by_trial = {r.data.tags["dilm.trial_id"]: r for r in children}
    assert len(children) == len(by_trial) == 3 and set(kill["running"]) <= set(by_trial)
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    sets = storage / "sets" / NAME
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{storage / 'optuna.db'}")
    told = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    during, twice = 0, {}
    for tid, run in by_trial.items():
        objective = json.loads((sets / tid / "final.json").read_text())[OBJECTIVE]
        assert run.data.metrics[OBJECTIVE] == pytest.approx(objective)
        assert trial_state(told[tid]) == "COMPLETE" and told[tid].value == pytest.approx(objective)
        for key in run.data.metrics:
            history = client.get_metric_history(run.info.run_id, key)
            steps = [m.step for m in history]
            if len(set(steps)) < len(steps):
                twice[(tid, key)] = steps
            during += sum(kill["killed_at"] * 1000 <= m.timestamp <= kill["back_at"] * 1000 for m in history)
    assert not twice, twice
    assert during > 0  # the trials logged while the server was down: their requests were retried, none lost
    assert len(told) == 3
    log = (storage / "mlflow-server.log").read_text()
    print(f"\nserver {kill['pid']} killed while {kill['running']} ran, answering again "
          f"{kill['back_at'] - kill['killed_at']:.1f} s later; {during} metric values logged meanwhile; the sweep "
          f"took {time.monotonic() - started:.0f} s; server log: {log.count('Uvicorn running')} starts")


# --------------------------------------------------------------------------- the tracking database down for long

URL = f"postgresql://dilm:{PASSWORD}@db.example:5432/sweeps"


def refused() -> OperationalError:
    return OperationalError("SELECT 1", {}, Exception(f"connection to server at db.example failed: Connection "
                                                      f"refused ({PASSWORD})\n\tIs the server running?"))


@pytest.fixture(autouse=True)
def database_answers(monkeypatch):
    """No database given up on before the test (:func:`tune.database.gone` is the driver process's)."""
    monkeypatch.setattr(tune.database, "_gone", [])


class FakeClock:
    def __init__(self):
        self.now, self.slept = 0.0, []

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_a_lost_connection_is_retried_with_backoff_and_said_twice(monkeypatch):
    monkeypatch.delenv(WAIT_ENV, raising=False)
    clock, said, failures = FakeClock(), [], [refused()] * 4

    def call():
        if failures:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit") from failures.pop()
        return "ok"

    assert retry(call, URL, say=lambda line, **_: said.append(line), sleep=clock.sleep, clock=lambda: clock.now) == "ok"
    assert clock.slept == [1, 2, 4, 8] and wait_s() == 300
    assert said == ["warning: the sweep's database postgresql://dilm:***@db.example:5432/sweeps does not answer "
                    "(connection to server at db.example failed: Connection refused (***)); trying again for up to "
                    "300 s",
                    "the sweep's database postgresql://dilm:***@db.example:5432/sweeps answers again"]


def test_a_database_down_longer_than_the_wait_is_one_line_and_a_refused_statement_is_not_retried(monkeypatch):
    monkeypatch.setenv(WAIT_ENV, "45")
    clock, said = FakeClock(), []

    def down():
        raise refused()

    with pytest.raises(DatabaseDown) as e:
        retry(down, URL, say=lambda line, **_: said.append(line), sleep=clock.sleep, clock=lambda: clock.now)
    message = str(e.value)
    assert clock.slept == [1, 2, 4, 8, 16, 14] and sum(clock.slept) == 45 and len(said) == 1
    assert message == ("the sweep's database postgresql://dilm:***@db.example:5432/sweeps did not answer for 45 s "
                       "(connection to server at db.example failed: Connection refused (***)): the sweep stopped; "
                       f"continue it with --resume once the database is back (${WAIT_ENV}=45 s is the wait)")
    assert isinstance(e.value, DilmError) and e.value.__cause__ is None and e.value.__suppress_context__

    def duplicate():
        raise IntegrityError("INSERT", {}, Exception("duplicate key"))

    assert gone() is e.value  # the driver gives up on it: its next call fails at once
    with pytest.raises(DatabaseDown):
        retry(lambda: "back", URL)
    monkeypatch.setattr(tune.database, "_gone", [])  # connect() at the next start forgets it
    clock.slept.clear()
    with pytest.raises(IntegrityError):
        retry(duplicate, URL, sleep=clock.sleep, clock=lambda: clock.now)
    assert clock.slept == []
    monkeypatch.setenv(WAIT_ENV, "soon")
    with pytest.raises(DilmError, match=f"\\${WAIT_ENV}='soon': give a number of seconds"):
        wait_s()


def test_a_database_down_ends_tunes_loop_and_what_the_searcher_could_not_tell_is_told_on_resume(tmp_path,
                                                                                                  monkeypatch):
    """Tune makes an error of the searcher's a trial's failure: ``PruneAwareOptunaSearch`` keeps the database's loss
    and the outcome it could not tell (saved with its state), the sweep's callback ends Tune's loop after the step
    (uncaught: no last save, as a killed driver), and the searcher restored by ``--resume`` tells it."""
    import sqlalchemy.orm
    from optuna.distributions import FloatDistribution

    from tune.database import study_storage
    from tune.search import PruneAwareOptunaSearch, TrialEnd

    url = f"sqlite:///{tmp_path / 'optuna.db'}"

    def searcher():
        return PruneAwareOptunaSearch({"lr": FloatDistribution(1e-5, 1e-3, log=True)}, metric=OBJECTIVE,
                                      mode="max", storage=study_storage(url), study_name="t")

    first = searcher()
    assert first.suggest("a") is not None and first.suggest("b") is not None
    monkeypatch.setenv(WAIT_ENV, "0")
    with monkeypatch.context() as m:
        m.setattr(sqlalchemy.orm.Session, "commit", lambda self: (_ for _ in ()).throw(refused()))
        first.on_trial_complete("a", result={OBJECTIVE: 70.0, FINAL: True})  # not raised: Tune would fail "a"
        assert gone() is not None and f"{url} did not answer" in str(gone())
        first.on_trial_complete("b", error=True)  # at once, now; an errored trial runs again on --resume
        assert first.suggest("c") is None
        with pytest.raises(DatabaseDown):
            TrialEnd(None, str(tmp_path)).on_step_end(iteration=1, trials=[])
    assert first._untold == {"a": (70.0, optuna.trial.TrialState.COMPLETE)} and not first._completed_trials
    first.save(str(tmp_path / "searcher.pkl"))  # what Tune saves with the experiment

    tune.database._gone.clear()  # the resumed driver's connect() found the database back
    resumed = searcher()
    resumed.restore(str(tmp_path / "searcher.pkl"))
    states = {t.user_attrs["ray_trial_id"]: (t.state.name, t.value) for t in optuna.load_study(
        study_name="t", storage=study_storage(url)).trials}
    assert states == {"a": ("COMPLETE", 70.0), "b": ("RUNNING", None)} and resumed._untold == {}
    assert "a" in resumed._completed_trials


def test_a_trial_that_ended_while_the_store_was_down_has_its_run_ended_by_the_resumed_sweep(tmp_path):
    from optuna.distributions import FloatDistribution

    from tune.search import end_left_running
    from tune.tracking import SweepTracker, TrialRun

    tracker = SweepTracker.start(f"sqlite:///{tmp_path / 'mlflow.db'}", "e", "s")
    study = optuna.create_study(direction="maximize")
    for tid, value in (("told", 70.0), ("pruned", None), ("running", None)):
        TrialRun(tracker.spec, tid)  # its run RUNNING: the trial's and TrialEnd's calls failed
        trial = study.ask({"lr": FloatDistribution(1e-5, 1e-3, log=True)})
        trial.set_user_attr("ray_trial_id", tid)
        if tid != "running":
            study.tell(trial, value, state=optuna.trial.TrialState.PRUNED if value is None else None)
    assert sorted(end_left_running(tracker, study)) == ["pruned", "told"]
    runs = {r.data.tags["dilm.trial_id"]: r for r in tracker.child_runs()}
    assert {t: r.info.status for t, r in runs.items()} == {"told": "FINISHED", "pruned": "FINISHED",
                                                           "running": "RUNNING"}
    assert runs["told"].data.metrics == {OBJECTIVE: 70.0} and runs["pruned"].data.tags["stopped_early"] == "asha"
    assert end_left_running(tracker, study) == []


def ended(proc, log: Path, timeout: float) -> str:
    """A driver's console once it has ended (then whatever it left is killed)."""
    try:
        proc.wait(timeout=timeout)
    finally:
        kill_tree(proc)
    return log.read_text()


@pytest.mark.slow  # ~6 min (11 on busy cores): the smoke sweep in PostgreSQL, stopped by its loss, resumed
def test_a_tracking_db_down_longer_than_the_wait_ends_the_sweep_in_one_line_and_resume_goes_on(
        postgres_server, tmp_path):  # noqa: F811 (the fixture imported)
    """The smoke sweep with ``--tracking-db``, its PostgreSQL stopped for good once a trial has finished; the driver
    waits ``$DILM_TRACKING_DB_WAIT_S`` (20 s here, and MLflow's client 2 retries: both short by configuration) for
    its study, then ends with one line naming the database (masked), exit status 2. With the database back,
    ``--resume`` ends the sweep: every trial COMPLETE once in the study, one FINISHED child run each, the trial
    finished before the loss not run again."""
    import sqlalchemy

    from tune.database import masked, study_storage, with_driver

    storage = tmp_path / "storage"
    storage.mkdir()
    config = write_yaml(storage, smoke())
    short = {WAIT_ENV: "20", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    url, started = postgres_server.url, time.monotonic()
    proc = driver(config, storage, storage / "first.log", "--tracking-db", url, secrets=short)
    try:
        while not finished_trials(storage):
            assert proc.poll() is None, (storage / "first.log").read_text()[-3000:]
            assert time.monotonic() < started + 420, "no trial finished within 420 s"
            time.sleep(0.5)
        before = finished_trials(storage)
        assert postgres_server.stop().returncode == 0
        stopped = time.monotonic()
        proc.wait(timeout=300)
        took = time.monotonic() - stopped
    finally:
        kill_tree(proc)
    out = (storage / "first.log").read_text()
    shown = masked(with_driver(url))  # postgresql+psycopg2://dilm:***@127.0.0.1:PORT/postgres
    errors = [line for line in out.splitlines() if line.startswith("dilm sweep: error:")]
    print(f"\nthe driver ended {took:.0f} s after the database stopped, rc {proc.returncode}: {errors}")
    assert proc.returncode == 2 and len(errors) == 1, out[-5000:]
    assert errors[0].startswith(f"dilm sweep: error: the sweep's database {shown} did not answer for "), errors
    assert errors[0].endswith(f"continue it with --resume once the database is back (${WAIT_ENV}=20 s is the wait)")
    assert f"warning: the sweep's database {shown} does not answer" in out
    assert PASSWORD not in out and "DatabaseDown" not in out and "StorageInternalError" not in out, out[-5000:]

    assert postgres_server.start().returncode == 0
    resumed = driver(config, storage, storage / "resumed.log", "--resume", "--tracking-db", url, secrets=short)
    out = ended(resumed, storage / "resumed.log", 480)
    assert resumed.returncode == 0 and "sweep crash: 3 complete" in out, out[-3000:]
    after = finished_trials(storage)
    assert len(after) == 3 and all(after[t] == m for t, m in before.items())  # not run again
    study = optuna.load_study(study_name="crash", storage=study_storage(with_driver(url)))
    complete = [t.user_attrs["ray_trial_id"] for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(complete) == sorted(after), [(t.user_attrs, t.state.name) for t in study.trials]
    engine = sqlalchemy.create_engine(with_driver(url))
    with engine.connect() as db:
        runs = db.execute(sqlalchemy.text(
            "select g.value, r.status, m.value from runs r join tags g on g.run_uuid = r.run_uuid left join "
            "latest_metrics m on m.run_uuid = r.run_uuid and m.key = 'objective' where g.key = 'dilm.trial_id'"
        )).fetchall()
    engine.dispose()
    objectives = {t: json.loads((storage / "sets" / "crash" / t / "final.json").read_text())[OBJECTIVE] for t in after}
    assert sorted(runs) == sorted((t, "FINISHED", pytest.approx(v)) for t, v in objectives.items())  # one run each
    print(f"resumed: {[t.state.name for t in study.trials]}; the whole test {time.monotonic() - started:.0f} s")
