"""A sweep that cannot run stops before Ray starts, in one line; a sweep driver stopped by SIGTERM stops as Ctrl-C
stops it (its state saved, one resume line, exit 143) and ``--resume`` finishes it.

The model rows run no Ray (``connect_ray`` and ``ray.init`` fail the test); the SIGTERM scenario is a real 2-trial
sweep on its own local cluster (slow), driven with the helpers of the crash-and-resume scenario of
``tests/tune/test_sweep.py``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from dilm import DilmError
from dilm.hf import hub_unreachable
from dilm.models import resolve_model
from tests.tune.test_sweep import SWEEPS, await_driver, driver, kill_tree, write_yaml
from tune.stop import RESUME_HINT, keep_sigterm_handler, sigterm_as_interrupt, watch_tune_stop
from tune.sweep import main

SMOKE = yaml.safe_load((SWEEPS / "smoke.yaml").read_text())
KNOWN = "is not a known model (smollm2-135m, minilm-l6, tiny-llama, tiny-bert), an existing local path, or a"

# the YAML's change → (the key the error names, the name that does not resolve)
BAD_MODELS = {
    "eval arch": ({"eval": {**SMOKE["eval"], "archs": ["minilm-probe", "nonexistent-model-xyz"]}},
                  "eval.archs", "nonexistent-model-xyz"),
    "icl arch": ({"eval": {**SMOKE["eval"], "archs": ["minilm-probe", "icl-nonexistent"]}},
                 "eval.archs", "icl-nonexistent"),
    "generator": ({"fixed": {**SMOKE["fixed"], "generator": "nonexistent-gen-xyz"}}, "fixed.generator",
                  "nonexistent-gen-xyz"),
    "learner": ({"fixed": {**SMOKE["fixed"], "learner": "nonexistent-learner"}}, "fixed.learner",
                "nonexistent-learner"),
    "probe": ({"fixed": {**SMOKE["fixed"], "probe": "nonexistent-probe"}}, "fixed.probe", "nonexistent-probe"),
    "searched learner": ({"search": {**SMOKE["search"], "learner": {"type": "categorical",
                                                                    "choices": ["tiny-bert", "no-such/learner"]}}},
                         "search.learner", "no-such/learner"),
}


@pytest.fixture
def no_ray(monkeypatch):
    import ray

    import tune.sweep

    def started(*args, **kwargs):
        raise AssertionError("Ray was started although the sweep cannot run")

    monkeypatch.setattr(tune.sweep, "connect_ray", started)
    monkeypatch.setattr(ray, "init", started)


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_a_model_that_does_not_resolve_is_one_line_before_ray(case, tmp_path, capsys, no_ray):
    change, key, name = BAD_MODELS[case]
    config = write_yaml(tmp_path, {**SMOKE, **change})
    start = time.monotonic()
    assert main(["--config", str(config), "--storage", str(tmp_path / "storage")]) == 2
    assert time.monotonic() - start < 20  # the local cache only (HF_HUB_OFFLINE): no hub retries with back-off
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).splitlines()
    assert len(lines) <= 2 and captured.err.startswith(f"dilm sweep: error: {config}: {key}: "), captured
    assert name in captured.err and KNOWN in captured.err
    assert not (tmp_path / "storage").exists()


def test_an_unreachable_hub_fails_at_once(monkeypatch):
    """Without HF_HUB_OFFLINE, a hub that does not answer (here a closed port) means the local cache only."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # discard: refused at once
    hub_unreachable.cache_clear()
    try:
        start = time.monotonic()
        with pytest.raises(DilmError, match=r"'nonexistent-gen-xyz' .*in the local cache \(127.0.0.1 is unreachable\)"):
            resolve_model("nonexistent-gen-xyz")
        assert time.monotonic() - start < 10
    finally:
        hub_unreachable.cache_clear()


def test_sigterm_is_handed_to_whatever_handles_sigint():
    """Tune's SIGINT handler while it runs (a graceful stop), else a KeyboardInterrupt; Ray's own SIGTERM handler,
    set by ray.init, does not replace the driver's."""
    terminated: list = []
    handed = []
    before = signal.getsignal(signal.SIGTERM)
    # SIGINT as a fresh process has it: an earlier test in this process (a sweep run in-process) may have left
    # Tune's handler, which would take the SIGTERM without raising
    sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        sigterm_cases(terminated, handed)
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert terminated == [signal.SIGTERM, signal.SIGTERM] and handed == [signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) == before  # the caller's handler is back


def sigterm_cases(terminated: list, handed: list) -> None:
    with sigterm_as_interrupt(terminated):
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs between bytecodes, long before this ends
        previous = signal.signal(signal.SIGINT, lambda signum, frame: handed.append(signum))  # as Tune does
        try:
            with keep_sigterm_handler():
                signal.signal(signal.SIGTERM, lambda signum, frame: None)  # as ray.init does
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        finally:
            signal.signal(signal.SIGINT, previous)


def test_tunes_restore_hint_is_dropped_and_says_the_fit_was_interrupted(caplog):
    import logging

    tune_log = logging.getLogger("ray.tune.tune")
    with watch_tune_stop() as stop:
        tune_log.warning("Wrote the latest version of all result files")
        assert not stop.interrupted
        tune_log.warning('Experiment has been interrupted, but the most recent state was saved.\n'
                         'Resume experiment with: Tuner.restore(path="/x", trainable=...)')
    assert stop.interrupted and "Wrote the latest" in caplog.text and "Tuner.restore" not in caplog.text
    assert stop not in tune_log.filters


TERM_SWEEP = {
    "name": "term", "task": "sst2", "num_samples": 2, "max_concurrent_trials": 2, "startup_trials": 1,
    "trial_resources": {"cpu": 1},
    "fixed": {"preset": "smoke", "device": "cpu", "outer_loops": 1, "lm_steps": 4},
    "search": {"temperature": {"type": "uniform", "low": 0.5, "high": 2.0}},
    "asha": {"time_attr": "training_iteration", "max_t": 100, "grace_period": 1},
    "eval": {"archs": ["tfidf-logreg"], "seeds": 1, "steps": 10, "test_limit": 100, "device": "cpu", "actors": 1,
             "actor_resources": {"cpu": 0}},
    "mlflow": {"experiment": "dilm-test-term"},
}


def trials_started(storage: Path) -> bool:
    return any((storage / "tune" / "term").glob("*/params.json"))


@pytest.mark.slow
def test_a_sweep_stopped_by_sigterm_says_how_to_resume_and_resumes(tmp_path):
    """SIGTERM to the driver alone (as a job scheduler sends it) while trials run: Tune saves the experiment, the
    summary says to continue with --resume, exit 143, no native stack dump and no Tuner.restore hint; --resume then
    finishes both trials (~4 + 4 minutes on 2 cores)."""
    config = write_yaml(tmp_path, TERM_SWEEP, "term.yaml")
    first = driver(config, tmp_path, tmp_path / "first.log")
    try:
        await_driver(first, tmp_path / "first.log", lambda: trials_started(tmp_path), "no trial started")
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)
    finally:
        kill_tree(first)
    out = (tmp_path / "first.log").read_text()
    assert first.returncode == 143, out[-3000:]
    assert f"— {RESUME_HINT}\n" in out, out[-3000:]  # the summary's first line
    assert "Tuner.restore(" not in out and "Fatal Python error" not in out and "(unknown)" not in out, out[-3000:]
    resumed = driver(config, tmp_path, tmp_path / "resumed.log", "--resume")
    try:
        resumed.wait(timeout=480)
    finally:
        kill_tree(resumed)
    out = (tmp_path / "resumed.log").read_text()
    assert resumed.returncode == 0 and "sweep term: 2 complete, 0 stopped early (ASHA), 0 failed\n" in out, out[-3000:]


@pytest.mark.parametrize("damage,file,resume", [
    ("state", "state/hurt.json", True),  # cut short: the parent run id and the saved YAML unreadable
    ("optuna", "optuna.db", True),
    ("optuna", "optuna.db", False),  # "already exists?" reads it too
])
def test_a_damaged_sweep_state_is_one_line_naming_it_before_ray(damage, file, resume, tmp_path, capsys, no_ray):
    storage = tmp_path / "storage"
    (storage / "state").mkdir(parents=True)
    if damage == "state":
        (storage / file).write_text('{"parent_run_id": "ab')
    else:
        (storage / file).write_bytes(b"not a database, " * 512)
    config = write_yaml(tmp_path, {**SMOKE, "name": "hurt"})
    assert main(["--config", str(config), "--storage", str(storage), *(["--resume"] if resume else [])]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"dilm sweep: error: {storage / file} is damaged (") and "Traceback" not in (
        captured.out + captured.err), captured
    assert len(captured.err.splitlines()) == 1
