"""A trial's own process killed mid-trial (SIGKILL: what the OOM killer or a lost node does to it), the driver and
the rest of the cluster left alone: the smoke sweep (``sweeps/smoke.yaml``, ``max_failures: 1``) on its own local
Ray cluster, one trial's Ray worker (``ray::ImplicitFunc``, found by its working directory: Tune's trial folder,
named by trial id) SIGKILLed once after its first distill checkpoint, another one killed on each of its two tries.
The first is retried and resumes from its checkpoint; the second fails, once its retries are spent; the sweep goes on
and ends, and nothing of either is half-written."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml

from tests.tune.test_sweep import SWEEPS, driver, kill_tree, write_yaml
from tune.report import trial_state
from tune.scores import OBJECTIVE

NAME, EXPERIMENT = "smoke", "dilm-smoke"


def trial_workers(session: int) -> dict[str, psutil.Process]:
    """The live trial workers of the driver's session, by trial id: Ray's ``ray::ImplicitFunc`` processes run in
    their trial's working folder, ``…/working_dirs/<trial id>`` (``trial_dirname``)."""
    out = {}
    for p in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getsid(p.pid) == session and " ".join(p.cmdline()).startswith("ray::ImplicitFunc"):
                out[Path(p.cwd()).name] = p
    return out


def checkpoint_state(folder: Path) -> dict:
    """The trial's distill checkpoint state (``{}`` while there is none, or while it is swapped in)."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads((folder / "checkpoint" / "state.json").read_text())
    return {}


def kill_trials(proc, sets: Path, deadline: float) -> list[dict]:
    """While the driver runs: kill the first trial seen past its first outer loop (its checkpoint says so) once,
    then the next one so, and again its retry two seconds after it starts. Returns the kills, in order."""
    kills: list[dict] = []
    retried_seen: float | None = None
    while proc.poll() is None and len(kills) < 3:
        assert time.monotonic() < deadline, f"only {len(kills)} kills before the deadline: {kills}"
        workers = trial_workers(proc.pid)
        for tid, p in workers.items():
            state = checkpoint_state(sets / tid)
            done = (sets / tid / "final.json").exists()
            killed = [k for k in kills if k["trial"] == tid]
            if len(kills) < 2 and not killed and not done and state.get("outer", 0) >= 1:
                p.kill()  # psutil checks it is still the process found
                kills.append({"trial": tid, "pid": p.pid, "at": time.time(), "step": state["step"],
                              "outer": state["outer"]})
                break
            if len(kills) == 2 and tid == kills[1]["trial"] and p.pid != kills[1]["pid"]:  # the retry
                retried_seen = retried_seen or time.monotonic()
                if time.monotonic() - retried_seen >= 2:
                    p.kill()
                    kills.append({"trial": tid, "pid": p.pid, "at": time.time(), "step": state.get("step"),
                                  "outer": state.get("outer")})
                    break
        time.sleep(0.2)
    return kills


@pytest.mark.slow
def test_a_trial_whose_process_is_killed_is_retried_then_failed_and_the_sweep_goes_on(tmp_path):
    storage = tmp_path / "sweeps"
    storage.mkdir()
    raw = yaml.safe_load((SWEEPS / "smoke.yaml").read_text())
    raw["asha"]["grace_period"] = 50  # no trial stopped early: each reaches the checkpoint its kill waits for
    config = write_yaml(storage, raw, "smoke.yaml")
    started = time.monotonic()
    proc = driver(config, storage, storage / "driver.log")
    try:
        kills = kill_trials(proc, storage / "sets" / NAME, started + 600)
        proc.wait(timeout=max(60.0, started + 840 - time.monotonic()))
    finally:
        kill_tree(proc)
    out = (storage / "driver.log").read_text()
    assert len(kills) == 3, (kills, out[-3000:])
    check_killed_sweep(storage, kills, proc.returncode, out)
    print(f"\nkills: {kills}; the sweep took {time.monotonic() - started:.0f} s")


def check_killed_sweep(storage: Path, kills: list[dict], rc: int, out: str) -> None:
    from mlflow.tracking import MlflowClient

    sets = storage / "sets" / NAME
    retried, failed = kills[0]["trial"], kills[1]["trial"]
    # what the user sees: Ray's error for each death, Tune's table of failures, the summary; exit status 0 (some
    # trials complete)
    assert rc == 0, out[-3000:]
    assert f"sweep {NAME}: 2 complete, 0 stopped early (ASHA), 1 failed" in out, out[-3000:]
    died = [line for line in out.splitlines() if "ActorDiedError" in line or "actor died" in line.lower()]
    assert len(died) >= 3, out[-5000:]
    assert re.search(rf"Trial task failed for trial run_trial_{retried}\b", out) and re.search(
        rf"Trial task failed for trial run_trial_{failed}\b", out), out[-5000:]

    # the records: one MLflow child run per trial (a retry continues its run), the Optuna study
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], "tags.`mlflow.parentRunId` != ''")
    children = {r.data.tags["dilm.trial_id"]: r for r in runs if "baseline" not in r.data.tags}
    assert len(children) == 3 and {retried, failed} <= set(children)
    assert {tid: r.info.status for tid, r in children.items()} == {
        tid: "FAILED" if tid == failed else "FINISHED" for tid in children}
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{storage / 'optuna.db'}")
    states = {t.user_attrs["ray_trial_id"]: trial_state(t) for t in study.trials}
    assert states == {tid: "FAIL" if tid == failed else "COMPLETE" for tid in children}, states
    finals = {tid: json.loads((sets / tid / "final.json").read_text()) for tid in children if tid != failed}
    assert {t.user_attrs["ray_trial_id"]: t.value for t in study.trials if t.value is not None} == {
        tid: f[OBJECTIVE] for tid, f in finals.items()}
    for tid in finals:
        assert OBJECTIVE in children[tid].data.metrics

    # the retried trial resumed from its checkpoint: the matching steps up to it were not logged twice
    history = client.get_metric_history(children[retried].info.run_id, "match_loss")
    steps = [m.step for m in history]
    twice = sorted({s for s in steps if steps.count(s) > 1})
    assert not [s for s in twice if s <= kills[0]["step"]], (kills[0], steps)
    assert not (sets / retried / "checkpoint").exists()  # removed once its sets were final
    again = (sets / retried / "final.json").stat().st_mtime - kills[0]["at"]

    # nothing half-written: every file a reader opens is whole; the failed trial wrote no final.json, its
    # checkpoint stays (a --resume of the sweep does not run it again: Tune's max_failures are spent)
    assert not (sets / failed / "final.json").exists() and checkpoint_state(sets / failed).get("outer", 0) >= 1
    for f in sets.rglob("*"):
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(sets).parts):
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".jsonl":
                [json.loads(line) for line in f.read_text().splitlines()]
    leftovers = sorted(str(f.relative_to(storage)) for f in storage.rglob(".*"))
    print(f"\nmatch steps of the retried trial: {steps}, logged twice: {twice}; its final.json {again:.0f} s after "
          f"the kill; temporary files left: {leftovers}")
