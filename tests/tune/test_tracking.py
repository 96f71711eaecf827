"""MLflow tracking (a real sqlite store), the artifact plots, and ``dilm ui`` serving the store over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from dilm import DilmError
from tune import plots
from tune.tracking import (
    PARENT_TAG,
    TRIAL_TAG,
    SweepTracker,
    TrialRun,
    artifact_location,
    flatten,
    tracking_uri,
)
from tune.ui import ui_main

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sweep's parent run in a fresh sqlite store (creating the schema takes a few seconds: once per module)."""
    storage = tmp_path_factory.mktemp("storage")
    old = os.environ.pop("MLFLOW_TRACKING_URI", None)
    tracker = SweepTracker.start(tracking_uri(storage), "dilm-test", "sweep-a")
    yield storage, tracker
    if old is not None:
        os.environ["MLFLOW_TRACKING_URI"] = old


def test_uris(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db" and uri.startswith("sqlite:////")
    assert artifact_location(uri, "dilm sst2") == (tmp_path.resolve() / "mlartifacts" / "dilm_sst2").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking_uri(tmp_path) == "http://mlflow.internal:5000"
    assert artifact_location("http://mlflow.internal:5000", "x") is None  # the server decides
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}


def test_child_run_params_metrics_artifacts(store, tmp_path):
    _, tracker = store
    artifact = tmp_path / "set00.jsonl"
    artifact.write_text('{"text": "fine", "label": "positive"}\n')
    with TrialRun(tracker.spec, "t-ok", "run_trial_ok") as run:
        run.log_params({"inner_loop": 3, "dpc": (2, 4)})
        for step in range(5):
            run.log_metrics({"match_loss": 1.0 / (step + 1), "stage": "match", "nan": float("nan")}, step)
        run.log_artifact(artifact, "sets")
    child = tracker.find_child("t-ok")
    client = tracker.client
    assert child.info.status == "FINISHED"
    assert child.data.tags[PARENT_TAG] == tracker.spec.parent_run_id and child.data.tags[TRIAL_TAG] == "t-ok"
    assert child.data.params == {"inner_loop": "3", "dpc": "[2, 4]"}
    history = client.get_metric_history(child.info.run_id, "match_loss")
    assert [m.step for m in history] == [0, 1, 2, 3, 4]  # buffered, flushed on exit
    assert set(child.data.metrics) == {"match_loss"}  # strings and non-finite values are not metrics
    assert [a.path for a in client.list_artifacts(child.info.run_id, "sets")] == ["sets/set00.jsonl"]
    assert child.info.artifact_uri.startswith("file:///")  # absolute: trials run in another working dir


def test_failed_trial_and_retry_reuse_one_child(store):
    _, tracker = store
    with pytest.raises(RuntimeError, match="boom"), TrialRun(tracker.spec, "t-fail") as run:
        run.log_params({"temperature": -1.0})
        raise RuntimeError("boom")
    failed = tracker.find_child("t-fail")
    assert failed.info.status == "FAILED" and "boom" in failed.data.tags["dilm.error"]
    with TrialRun(tracker.spec, "t-fail") as run:  # Tune retries the trial: the same child run continues
        assert run.run_id == failed.info.run_id
        run.log_params({"temperature": -1.0, "seed": 0})  # known params are skipped, new ones added
    assert tracker.find_child("t-fail").data.params == {"temperature": "-1.0", "seed": "0"}
    tracker.end_child("t-fail", "KILLED", {"stopped_early": "asha"})
    assert tracker.find_child("t-fail").info.status == "KILLED"
    ids = [r.data.tags[TRIAL_TAG] for r in tracker.child_runs()]
    assert sorted(ids) == sorted(set(ids))  # one child per trial


def test_resumed_sweep_reopens_its_parent(store):
    storage, tracker = store
    again = SweepTracker.start(tracking_uri(storage), "dilm-test", "sweep-a", parent_run_id=tracker.spec.parent_run_id)
    assert again.spec == tracker.spec
    again.log_params({"num_samples": 3})
    again.log_params({"num_samples": 3, "seed": 0})
    again.end("FINISHED")
    parent = tracker.client.get_run(tracker.spec.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params == {"num_samples": "3", "seed": "0"}


def test_plots_are_pngs(tmp_path):
    scores = {2: {"minilm-l6": {"accuracy": 60.0, "accuracy_std": 2.0, "n": 3},
                  "tfidf-logreg": {"accuracy": 55.0, "accuracy_std": 1.0, "n": 3}},
              4: {"minilm-l6": {"accuracy": 66.0, "accuracy_std": 1.5, "n": 3},
                  "tfidf-logreg": {"accuracy": 57.0, "accuracy_std": 0.5, "n": 3}}}
    paths = plots.accuracy_vs_dpc_all(scores, tmp_path, "trial x")
    assert [p.name for p in paths] == ["accuracy_vs_dpc_minilm-l6.png", "accuracy_vs_dpc_tfidf-logreg.png"]
    imp = plots.param_importances({"generator_lr": 0.7, "temperature": 0.3}, tmp_path / "imp.png")
    for p in [*paths, imp]:
        assert p.read_bytes()[:8] == PNG
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.integration
def test_ui_serves_the_runs(store, tmp_path):
    """``dilm ui`` (``python -m tune.ui``) on 127.0.0.1: the REST API lists the sweep's runs, it prints the
    direct link to the experiment's runs page, and SIGTERM to it stops the MLflow server and its workers."""
    import psutil

    storage, tracker = store
    port = free_port()
    log = tmp_path / "ui.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tune.ui", "--storage", str(storage), "--port",
                                 str(port)], start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"mlflow ui exited with {proc.returncode}"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, "mlflow ui did not come up within 90 s"
                time.sleep(0.5)
        runs = post(f"{base}/api/2.0/mlflow/runs/search",
                    {"experiment_ids": [tracker.spec.experiment_id], "max_results": 100})["runs"]
        ids = {r["info"]["run_id"] for r in runs}
        assert tracker.spec.parent_run_id in ids
        assert tracker.find_child("t-ok").info.run_id in ids
        assert f"{base}/#/experiments/{tracker.spec.experiment_id}/runs" in log.read_text()
        server = psutil.Process(proc.pid).children(recursive=True)
        assert server
        proc.send_signal(signal.SIGTERM)  # to `dilm ui` alone, as a service manager does
        assert proc.wait(timeout=30) != 0
        gone, alive = psutil.wait_procs(server, timeout=30)
        assert not alive, f"still running after SIGTERM to dilm ui: {alive}"
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{base}/health", timeout=2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the whole group, if the test failed before
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_ui_without_a_store_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(DilmError, match="no MLflow store"):
        ui_main(["--storage", str(tmp_path / "nothing")])


def test_ui_points_at_a_tracking_server(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert ui_main([]) == 0
    assert "http://mlflow.internal:5000" in capsys.readouterr().out



def test_asha_stopped_trial_ends_finished_with_its_tag_and_runs_read_at_a_glance(store, tmp_path):
    """TrialEnd (the driver callback) on a trial whose last report was not final (ASHA stopped it): the child run is
    FINISHED with ``stopped_early=asha``, not KILLED; a finished trial's run is named id, objective, values."""
    from types import SimpleNamespace

    from tune.search import TrialEnd
    from tune.tracking import run_label

    _, tracker = store
    values = {"generator_lr": 3.21e-05, "inner_loop": 2}
    with TrialRun(tracker.spec, "abcd1234_00003", run_label("abcd1234_00003", values)) as run:
        run.rename(run_label("abcd1234_00003", values, 61.234))
    with TrialRun(tracker.spec, "abcd1234_00004", run_label("abcd1234_00004", values)):
        pass
    end = TrialEnd(tracker.spec, str(tmp_path))
    end.on_trial_complete(0, [], SimpleNamespace(trial_id="abcd1234_00004", last_result={"final": False}))
    stopped = tracker.find_child("abcd1234_00004")
    assert stopped.info.status == "FINISHED" and stopped.data.tags["stopped_early"] == "asha"
    assert stopped.info.run_name == "00004 generator_lr=3.21e-05 inner_loop=2"
    assert tracker.find_child("abcd1234_00003").info.run_name == "00003 obj 61.2 | generator_lr=3.21e-05 inner_loop=2"


def test_the_experiment_opens_as_model_development_and_the_winner_reads_at_a_glance(store):
    from tune.tracking import BEST_MARK, BEST_TAG, EXPERIMENT_KIND_TAG, NOTE_TAG

    _, tracker = store
    exp = tracker.client.get_experiment(tracker.spec.experiment_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"  # not MLflow 3's GenAI traces view
    with TrialRun(tracker.spec, "t-win", "00007 obj 70.1 | x=1"):
        pass
    tracker.mark_best("t-win", "best-random +6.0 [+2.1,+9.9]*")
    tracker.mark_best("t-win", "best-random +6.0 [+2.1,+9.9]*")  # again (a resumed sweep): one mark
    run = tracker.find_child("t-win")
    assert run.info.run_name == f"{BEST_MARK} 00007 obj 70.1 | x=1" and run.data.tags[BEST_TAG] == "true"
    assert run.data.tags[NOTE_TAG].startswith("best-random +6.0")
