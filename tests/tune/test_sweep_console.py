"""What a user sees of a real sweep (slow: one 3-trial smoke sweep on a private 2-CPU Ray cluster, ~3 min): a console
that reads as a run (trial progress and the final summary; no native stack trace when ASHA stops a trial, no
model-loading bars, no deprecation warnings), the one-page report, and ``dilm ui`` opening on the winner in a real
browser (headless Chromium over the DevTools protocol: :mod:`browser`).

The sweep's ASHA counts distill's steps with ``max_t: 13``: the trial that matches 3 inner steps per outer loop
validates at step 13 and is stopped there, in the middle of its matching; the one with 1 inner step finishes (its
last validation comes at step 12).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.browser import chromium, render
from tune.tracking import VIEW_METRICS

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("SIGABRT", "Traceback", "Loading weights", "Writing model shards", "torch_dtype", "Deprecat")


def console_sweep() -> dict:
    cfg = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())
    first = {"generator_lr": 1e-4, "temperature": 1.0}
    return {**cfg, "name": "console", "mlflow": {"experiment": "dilm-test-console"},
            "asha": {"time_attr": "step", "max_t": 13, "grace_period": 1, "reduction_factor": 2},
            "points_to_evaluate": [{**first, "inner_loop": 1}, {**first, "inner_loop": 3}]}


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """``python -m tune.sweep`` (= ``dilm sweep``) run to its end as a user runs it; its whole console output."""
    storage = tmp_path_factory.mktemp("console")
    config = storage / "console.yaml"
    config.write_text(yaml.safe_dump(console_sweep()))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["RAY_DEDUP_LOGS"] = "0"  # every worker's lines, as they come
    log = storage / "console.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tune.sweep", "--config", str(config), "--storage",
                                 str(storage), "--address", "local", "--num-cpus", "2"], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    try:
        proc.wait(timeout=900)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # Ray's agents, if the driver died before stopping them
    return {"storage": storage, "rc": proc.returncode, "out": log.read_text(errors="replace")}


@pytest.mark.slow
def test_the_console_reads_as_a_run_not_a_crash(finished_sweep):
    s = finished_sweep
    out = s["out"]
    assert s["rc"] == 0, out[-4000:]
    bad = [line for line in out.splitlines() if any(w in line for w in FORBIDDEN)]
    assert not bad, "\n".join(bad[:40])
    assert "Trial status:" in out and re.search(r"Trial run_trial_\w+ completed after", out)  # trial progress
    counts = re.search(r"^sweep console: (\d+) complete, (\d+) stopped early \(ASHA\), 0 failed$", out, re.M)
    assert counts and int(counts.group(1)) >= 1 and int(counts.group(2)) >= 1, out[-3000:]
    assert "best trial vs baselines" in out
    report = re.search(r"^  report: +(\S+)$", out, re.M)
    assert report and Path(report.group(1)) == s["storage"] / "reports" / "console" / "report.html"
    assert Path(report.group(1)).read_text().startswith("<!doctype html>")


def test_a_trial_stopped_mid_operator_exits_without_a_native_stack_trace(ray_cluster, tmp_path):
    """Mid-sweep, Tune stops a trial while another goes on; the stopped trial's thread unwinds through a ``finally``
    that runs torch operators (as distill's do) while its actor is terminated. Without ``join_at_exit`` the worker
    aborts (``*** SIGABRT received ***``, ``Fatal Python error: Aborted`` and a C++ trace in its log, which the
    driver's console shows); with it, it ends quietly."""
    import ray
    from ray import tune
    from ray.tune import RunConfig, TuneConfig, Tuner

    def stopped_mid_operator(config):
        import torch

        from tune.trial_exit import join_at_exit

        join_at_exit()
        w = torch.randn(600, 600)
        try:
            for i in range(10**6):
                w = torch.tanh(w @ w / 600)
                tune.report({"i": i})
        finally:  # the stopped trial unwinds through torch work (~50 ms operators, GIL released)
            (Path(config["dir"]) / f"unwinding{config['x']}").write_text(str(os.getpid()))
            w = torch.randn(1000, 1000)
            for _ in range(60 if config["x"] == 0 else 1):
                w = torch.tanh(w @ w / 1000)

    def stop(trial_id, result):  # trial x=0 early (as ASHA would), x=1 long after
        return result["training_iteration"] >= (2 if result["config"]["x"] == 0 else 150)

    Tuner(tune.with_resources(stopped_mid_operator, {"cpu": 1}),
          param_space={"dir": str(tmp_path), "x": tune.grid_search([0, 1])},
          tune_config=TuneConfig(max_concurrent_trials=2),
          run_config=RunConfig(storage_path=str(tmp_path / "tune"), stop=stop, verbose=0)).fit()
    pid = int((tmp_path / "unwinding0").read_text())  # the stopped trial was unwinding when its actor ended
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, "the stopped trial's worker did not exit"
        time.sleep(0.2)
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    [err] = logs.glob(f"worker-*-{pid}.err")
    assert not [line for line in err.read_text().splitlines() if "SIGABRT" in line or "Fatal Python" in line]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def winner(storage: Path) -> tuple[str, str, list[str]]:
    """The marked winner's run name and objective as the UI writes numbers, and the parent run's artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{storage}/mlflow.db")
    exp = client.get_experiment_by_name("dilm-test-console")
    [best] = client.search_runs([exp.experiment_id], "tags.`dilm.best` = 'true'")
    [parent] = client.search_runs([exp.experiment_id], "tags.`dilm.sweep` = 'console' and attributes.run_name = "
                                  "'console'")
    value = repr(best.data.metrics["objective"])
    arts = [a.path for a in client.list_artifacts(parent.info.run_id)]
    return best.info.run_name, value.removesuffix(".0"), arts  # JavaScript prints 52.0 as 52


@pytest.fixture(scope="module")
def browser_exe() -> str:
    """The distribution's Chromium (set up before the sweep: without one the browser test skips at once)."""
    exe = chromium()
    if exe is None:
        pytest.skip("no chromium to render the MLflow UI (make browser, or apt-get install chromium)")
    return exe


@pytest.mark.slow
def test_dilm_ui_opens_on_the_winner_in_a_browser(browser_exe, finished_sweep, tmp_path):
    """``dilm ui`` on the finished sweep; the URL it prints, in headless Chromium: the rendered page (not the HTML
    source, which is an empty app shell) holds the trials as rows with the winner's name and objective, and the
    margin columns. ``DILM_UI_SCREENSHOT=path`` keeps the screenshot there."""
    storage = finished_sweep["storage"]
    name, objective, artifacts = winner(storage)
    assert name.startswith("★ best") and "report.html" in artifacts
    port, log = _free_port(), tmp_path / "ui.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tune.ui", "--storage", str(storage), "--port",
                                 str(port)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # the printed URL, and the server answering
            assert proc.poll() is None, log.read_text()
            opened = re.search(r"^  open (\S+)", log.read_text(), re.M)
            with contextlib.suppress(OSError):
                if opened and urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            assert time.monotonic() < deadline, f"dilm ui did not serve within 120 s:\n{log.read_text()}"
            time.sleep(0.5)
        url = opened.group(1)
        with urllib.request.urlopen(url.split("#")[0], timeout=10) as r:
            assert name not in r.read().decode()  # the source is an app shell: only a browser shows the runs
        shot = Path(os.environ.get("DILM_UI_SCREENSHOT") or tmp_path / "ui.png")
        text = render(url, [name, objective, *VIEW_METRICS, "baseline random"], screenshot=shot)  # every margin
        assert "Judges" not in text and "Sessions" not in text  # MLflow 3's GenAI sidebar: not the training view
        assert shot.read_bytes().startswith(b"\x89PNG")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
