"""Sweeps whose trials run on nodes without a shared filesystem: a trial is handed only URIs, never a path of the
driver's machine; trials are pinned to nodes by custom resources."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import pytest

from dilm import DilmError

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = ROOT / "sweeps"


def strings(obj) -> list[str]:
    """Every string inside a (nested) dataclass / mapping / sequence."""
    if isinstance(obj, str):
        return [obj]
    if dataclasses.is_dataclass(obj):
        return [s for f in dataclasses.fields(obj) for s in strings(getattr(obj, f.name))]
    if isinstance(obj, dict):
        return [s for kv in obj.items() for x in kv for s in strings(x)]
    if isinstance(obj, list | tuple):
        return [s for x in obj for s in strings(x)]
    return []


def test_a_trial_of_a_uri_sweep_gets_no_local_path(tmp_path, monkeypatch):
    """Everything a trial reads or writes comes as a URI: the sets, the LM checkpoints, the Tune experiment and the
    tracking server; no string of its plan names a path of the driver's machine."""
    from tune.config import load_config
    from tune.paths import SweepPaths
    from tune.pool import PoolSpec
    from tune.sweep import make_plan, needs_server
    from tune.tracking import TrackingSpec

    monkeypatch.setenv("DILM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(SWEEPS / "smoke.yaml", storage="s3://dilm-test/sweeps")
    paths = SweepPaths.of(cfg)
    assert paths.remote and paths.storage.is_relative_to(tmp_path / "cache")  # the driver's own files: a mirror
    assert paths.tune_dir == "s3://dilm-test/sweeps/tune/smoke" and needs_server(paths, autoscaling=False)
    plan = make_plan(cfg, paths, ("negative", "positive"), False, PoolSpec("ns", ("a",)),
                     TrackingSpec("http://10.0.0.2:5000", "1", "run", cfg.name))
    assert plan.sets_dir == "s3://dilm-test/sweeps/sets/smoke" and plan.lm_dir == "s3://dilm-test/sweeps/lm"
    leaked = [s for s in strings(plan) if s.startswith(("/", "sqlite:", "file:")) or str(tmp_path) in s]
    assert not leaked
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")  # a server of one's own: used as it is
    assert not needs_server(paths, autoscaling=True)
    local = SweepPaths.of(load_config(SWEEPS / "smoke.yaml", storage=tmp_path / "runs"))
    assert not local.remote and local.storage == tmp_path / "runs" and local.location == str(tmp_path / "runs")
    assert local.tune_dir == str(tmp_path / "runs" / "tune" / "smoke")


def test_custom_resources_pin_trials_and_are_checked():
    from tune.config import Resources, load_config
    from tune.sweep import check_resources

    r = Resources(cpu=1, custom={"worker": 1})
    assert r.as_tune() == {"cpu": 1.0, "worker": 1.0}
    assert r.as_remote() == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": {"worker": 1.0}}
    with pytest.raises(DilmError, match="other names than cpu/gpu/memory"):
        Resources(custom={"GPU": 1})
    cfg = dataclasses.replace(load_config(SWEEPS / "smoke.yaml", smoke=True), trial_resources=r)
    with pytest.raises(DilmError, match=r"custom resource\(s\) \['worker'\]"):
        check_resources(cfg, {"CPU": 2.0})
    assert check_resources(cfg, {"CPU": 2.0, "worker": 1.0}) == []


# --------------------------------------------------------------------------- two nodes, no shared filesystem


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_node(args: list[str], env: dict, log: Path, hide: Path | None = None):
    """``ray start ... --block`` in its own session (stopping it stops what it started); with ``hide``, inside a new
    mount namespace where a fresh tmpfs covers ``hide``: that node cannot see what the driver keeps there."""
    import shlex
    import subprocess
    import sys

    ray_start = [str(Path(sys.executable).parent / "ray"), "start", "--block", *args]
    if hide is not None:
        ray_start = ["unshare", "--mount", "sh", "-c", f"mount -t tmpfs tmpfs {shlex.quote(str(hide))} && exec "
                     + shlex.join(ray_start)]
    with open(log, "w") as out:
        return subprocess.Popen(ray_start, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def s3_files(env: dict, location: str) -> dict[str, float]:
    """{key: mtime} of every file under ``location`` (read in a subprocess-free way with this process's env)."""
    import os

    from tune.storage import ArrowStorage

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        store = ArrowStorage(location)
        import pyarrow.fs

        infos = store.fs.get_file_info(pyarrow.fs.FileSelector(store.base, recursive=True, allow_not_found=True))
        return {i.path[len(store.base) + 1:]: i.mtime_ns for i in infos if i.type == pyarrow.fs.FileType.File}
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.slow
def test_sweep_on_s3_with_trials_on_a_node_that_cannot_see_the_driver(s3_server, tmp_path):
    """The smoke sweep with its storage on a local S3 server, on a two-node Ray cluster whose worker node (the only
    one with the custom resource ``worker`` that trials ask for) has a tmpfs over the folder holding the driver's
    files and caches: trials complete, their sets, the LM checkpoint, the results and the MLflow runs are all found;
    the driver is SIGKILLed after the first trial and ``--resume`` finishes without running it again."""
    import json
    import os
    import shutil
    import sqlite3
    import subprocess
    import sys
    import tempfile
    import time
    import uuid

    import yaml

    from tests.tune.test_sweep import kill_tree

    root = Path(tempfile.mkdtemp(prefix="dr", dir="/tmp"))  # short: Ray's socket paths have a length limit
    storage = f"s3://dilm-test/{uuid.uuid4().hex[:8]}/sweeps"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "DILM_SWEEP_DIR")}
    env.update(s3_server, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    if (Path.home() / ".ray" / "auth_token").exists():  # Ray 2.60 then enables token auth: every client uses it
        env["RAY_AUTH_MODE"] = "token"
    head_env = {**env, "DILM_CACHE": str(root / "head-cache")}
    worker_env = {**env, "DILM_CACHE": str(root / "worker-cache")}  # inside the worker's tmpfs
    port = free_port()
    common = ["--node-ip-address", "127.0.0.1", "--object-store-memory", str(200 * 1024**2),
              "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats"]
    raw = yaml.safe_load((SWEEPS / "smoke.yaml").read_text())
    # the user's own CSV, in a folder the worker node cannot see: it reaches the trials through the S3 storage
    from tests.userdata import write_reviews

    train_csv, test_csv = write_reviews(root / "data")
    raw.update(name="s3smoke", trial_resources={"cpu": 1, "gpu": 0, "custom": {"worker": 1}},
               mlflow={"experiment": "dilm-test-s3"},
               task={"name": "reviews", "train": str(train_csv), "test": str(test_csv), "text_column": "review",
                     "label_column": "sentiment"})
    config = tmp_path / "s3smoke.yaml"
    config.write_text(yaml.safe_dump(raw))
    nodes, drivers = [], []

    def driver(*extra: str) -> subprocess.Popen:
        log = tmp_path / f"driver{len(drivers)}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "tune.sweep", "--config", str(config), "--storage",
                                     storage, "--address", f"127.0.0.1:{port}", *extra], cwd=ROOT, env=head_env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        drivers.append((proc, log))
        return proc

    started = time.monotonic()
    try:
        nodes.append(start_node(["--head", "--port", str(port), "--num-cpus", "1", "--include-dashboard", "false",
                                 "--ray-client-server-port", str(free_port()), "--temp-dir", str(root / "h"),
                                 *common], head_env, tmp_path / "head.log"))
        time.sleep(8)
        nodes.append(start_node(["--address", f"127.0.0.1:{port}", "--num-cpus", "2", "--resources",
                                 '{"worker": 2}', "--temp-dir", str(root / "w"), *common], worker_env,
                                tmp_path / "worker.log", hide=root))
        probe = subprocess.run([sys.executable, "-c", (
            "import ray, time, sys\n"
            f"ray.init(address='127.0.0.1:{port}')\n"
            "deadline = time.time() + 120\n"
            "while ray.cluster_resources().get('worker', 0) < 2 and time.time() < deadline: time.sleep(1)\n"
            f"look = ray.remote(resources={{'worker': 1}}, num_cpus=0)(lambda: __import__('os').listdir('{root}'))\n"
            "print(sorted(ray.get(look.remote())))\n")], env=head_env, capture_output=True, text=True, timeout=180)
        assert probe.returncode == 0, probe.stderr[-3000:]
        assert (root / "h").is_dir()  # the head's Ray folder: hidden from the worker, which sees only its own
        assert probe.stdout.strip().splitlines()[-1] == "['w']", probe.stdout

        first = driver()
        deadline = time.monotonic() + 900
        while not [k for k in s3_files(s3_server, storage) if k.startswith("sets/s3smoke/")
                   and k.endswith("/final.json") and "/baselines/" not in k]:
            assert first.poll() is None, drivers[0][1].read_text()[-4000:]
            assert time.monotonic() < deadline, "no trial finished within 900 s"
            time.sleep(1)
        kill_tree(first)
        before = {k: m for k, m in s3_files(s3_server, storage).items() if k.endswith("/final.json")}
        resumed = driver("--resume")
        resumed.wait(timeout=1200)
        out = drivers[1][1].read_text()
        assert resumed.returncode == 0, out[-4000:]
        wall = time.monotonic() - started

        files = s3_files(s3_server, storage)
        finals = sorted(k for k in files if k.endswith("/final.json") and "/baselines/" not in k)
        assert len(finals) == 3 and "sweep s3smoke: 3 complete" in out, out[-3000:]
        for k, mtime in before.items():
            assert files[k] == mtime, k  # a trial finished before the kill was not run again
        for final in finals:
            trial = final.rsplit("/", 1)[0]
            assert {f"{trial}/provenance.json", f"{trial}/scores.json", f"{trial}/sets/dpc2/set00.jsonl"} <= set(files)
            assert not any(k.startswith(f"{trial}/checkpoint/") for k in files)
        [lm_meta] = [k for k in files if k.startswith("lm/") and k.endswith("/dilm_lm.json")]
        assert {"optuna.db", "mlflow.db", "state/s3smoke.json", "reports/s3smoke/trials.csv",
                "sets/s3smoke/baselines/vanilla/scores.json", "sets/s3smoke/baselines/random/scores.json"} <= set(files)
        assert any(k.startswith("mlartifacts/") and k.endswith("/provenance.json") for k in files)

        # a trial ran on the worker, from the LM checkpoint fetched into that node's cache
        local = Path(tempfile.mkdtemp(dir=tmp_path))
        from tune.storage import open_storage

        os.environ.update(s3_server)
        store = open_storage(storage)
        prov = store.read_json(f"{finals[0].rsplit('/', 1)[0]}/provenance.json")
        from dilm.tasks import load_task
        from tune.config import load_config

        data = load_task(load_config(config).task)
        assert f"data/{data.fingerprint[:16]}/train-train.csv" in files  # the driver published the user's files
        assert prov["task"]["sha256"] == data.fingerprint and prov["config"]["task"]["train"].startswith("s3://")
        labels = {json.loads(line)["label"] for line in store.read_text(finals[0].rsplit("/", 1)[0] +
                                                                        "/sets/dpc2/set00.jsonl").splitlines()}
        assert labels == {"neg", "pos"}
        assert prov["lm_checkpoint"] == str(root / "worker-cache" / "storage" / "lm" / lm_meta.split("/")[1])
        assert not (root / "worker-cache").exists()  # ... a folder the driver's machine does not see

        # the MLflow runs, from the database the driver uploaded
        store.get_file("mlflow.db", local / "mlflow.db")
        db = sqlite3.connect(local / "mlflow.db")
        runs = dict(db.execute("select r.run_uuid, r.status from runs r join tags t on t.run_uuid = r.run_uuid "
                               "where t.key = 'dilm.trial_id'").fetchall())
        assert len(runs) == 3 and set(runs.values()) == {"FINISHED"}
        objectives = db.execute("select count(distinct run_uuid) from latest_metrics where key = 'objective'")
        assert objectives.fetchone()[0] >= 3  # the trials' (and the baselines')
        state = json.loads(store.read_text("state/s3smoke.json"))
        assert state["tracking_server"].startswith("http://")
        print(f"two-node S3 sweep with a kill and a resume: {wall:.0f} s")
    finally:
        for log in (root / "head-cache" / "storage" / "mirror").glob("*/mlflow-server.log"):
            shutil.copy(log, tmp_path / "mlflow-server.log")
        for proc, _ in drivers:
            kill_tree(proc)
        for node in reversed(nodes):
            node.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=60)
            kill_tree(node)
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- the head lost: a fresh one resumes


def published_marker(env: dict, storage: str, name: str) -> dict:
    from tune.storage import ArrowStorage

    files = s3_files(env, storage)
    if f"state/{name}.published.json" not in files:
        return {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return json.loads(ArrowStorage(storage).read_text(f"state/{name}.published.json"))
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def login(cache: Path) -> dict[str, str]:
    found = list((cache / "secrets").glob("*.mlflow-login")) if (cache / "secrets").is_dir() else []
    return dict(line.split("=", 1) for line in found[0].read_text().splitlines()) if found else {}


@pytest.mark.slow
def test_a_fresh_head_resumes_from_the_storage_alone(s3_server, tmp_path):
    """The smoke sweep on S3 (single node): the driver publishes its databases as trials end; it is SIGKILLed once a
    finished trial is published, its whole $DILM_CACHE (the mirror of its databases, staging, LM cache) wiped — a new
    head, whose $DILM_CACHE is another folder — and ``--resume`` runs from the URI alone (nothing opened or made at
    the first head's paths, which Tune's pickled searcher and the state file name): every trial finished before the
    kill keeps its MLflow run (FINISHED, its objective; the same parent run), its Optuna trial (COMPLETE, the same
    value) and is not run again. The tracking server
    it serves wants the sweep's password (401 without), trials log with it, and neither run's password is in any
    file of the storage, the new head's folder, an MLflow param or tag, or the console."""
    import shutil
    import sqlite3
    import subprocess
    import sys
    import time
    import uuid

    import yaml

    from tests.tune.test_auth import status
    from tests.tune.test_sweep import kill_tree

    storage = f"s3://dilm-test/{uuid.uuid4().hex[:8]}/sweeps"
    cache = tmp_path / "head-cache"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "DILM_SWEEP_DIR")}
    env.update(s3_server, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT), DILM_CACHE=str(cache))
    raw = yaml.safe_load((SWEEPS / "smoke.yaml").read_text())
    raw.update(name="headloss", mlflow={"experiment": "dilm-test-headloss"})
    raw["fixed"].update(outer_loops=1, lm_steps=4)
    config = tmp_path / "headloss.yaml"
    config.write_text(yaml.safe_dump(raw))
    drivers = []

    def driver(*extra: str) -> subprocess.Popen:
        log = tmp_path / f"driver{len(drivers)}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "tune.sweep", "--config", str(config), "--storage",
                                     storage, "--address", "local", "--num-cpus", "2", *extra], cwd=ROOT, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        drivers.append((proc, log))
        return proc

    started = time.monotonic()
    try:
        first = driver()
        deadline, finished, refused = time.monotonic() + 900, [], None
        while not finished:
            assert first.poll() is None, drivers[0][1].read_text()[-4000:]
            assert time.monotonic() < deadline, "no finished trial published within 900 s"
            time.sleep(1)
            if refused is None and login(cache).get("url"):
                refused = status(login(cache)["url"] + "/api/2.0/mlflow/runs/search", {})
            files = s3_files(s3_server, storage)
            finished = [t for t in published_marker(s3_server, storage, "headloss").get("trials_ended", [])
                        if f"sets/headloss/{t}/final.json" in files]
        assert refused == 401  # an unauthenticated request to the served store
        passwords = [login(cache)["password"]]
        kill_tree(first)
        before = {t: s3_files(s3_server, storage)[f"sets/headloss/{t}/final.json"] for t in finished}
        shutil.rmtree(cache)  # a new head: nothing of the first one's folder, and its own folder elsewhere
        cache, first_cache = tmp_path / "new-head-cache", cache
        env["DILM_CACHE"] = str(cache)
        resumed = driver("--resume")
        resumed.wait(timeout=900)
        out = drivers[1][1].read_text()
        assert resumed.returncode == 0, out[-4000:]
        assert "fetched" in out and "sweep headloss: 3 complete" in out, out[-3000:]
        passwords.append(login(cache)["password"])
        wall = time.monotonic() - started
        assert not first_cache.exists()

        files = s3_files(s3_server, storage)
        for t, mtime in before.items():
            assert files[f"sets/headloss/{t}/final.json"] == mtime, t  # not run again
        from tune.storage import ArrowStorage

        os.environ.update(s3_server)
        store = ArrowStorage(storage)
        store.get_file("mlflow.db", tmp_path / "mlflow.db")
        store.get_file("optuna.db", tmp_path / "optuna.db")
        db = sqlite3.connect(tmp_path / "mlflow.db")
        parents = db.execute("select count(*) from tags where key = 'dilm.sweep' and value = 'headloss' and run_uuid "
                             "not in (select run_uuid from tags where key = 'mlflow.parentRunId')").fetchone()[0]
        assert parents == 1  # the resumed sweep continued its parent run
        import optuna

        study = optuna.load_study(study_name="headloss", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
        by_ray_id = {t.user_attrs.get("ray_trial_id"): t for t in study.trials}
        for t in before:
            objective = json.loads(store.read_text(f"sets/headloss/{t}/final.json"))["objective"]
            [(run, state)] = db.execute("select r.run_uuid, r.status from runs r join tags g on g.run_uuid = "
                                        "r.run_uuid where g.key = 'dilm.trial_id' and g.value = ?", (t,)).fetchall()
            assert state == "FINISHED"
            [(logged,)] = db.execute("select value from latest_metrics where run_uuid = ? and key = 'objective'",
                                     (run,)).fetchall()
            assert logged == pytest.approx(objective)
            assert by_ray_id[t].state.name == "COMPLETE" and by_ray_id[t].value == pytest.approx(objective)

        secrets = [p.encode() for p in passwords]
        leaked = [k for k in files if any(s in store_bytes(store, k) for s in secrets)]
        leaked += [str(p) for p in (cache / "storage").rglob("*") if p.is_file() and any(s in p.read_bytes()
                                                                                        for s in secrets)]
        leaked += [log.name for _, log in drivers if any(s in log.read_bytes() for s in secrets)]
        assert not leaked
        values = [v for (v,) in db.execute("select value from params union all select value from tags")]
        assert not [v for v in values if any(p in str(v) for p in passwords)]
        print(f"fresh-head resume from S3: {wall:.0f} s, {len(before)} trial(s) finished before the kill")
    finally:
        for proc, _ in drivers:
            kill_tree(proc)


def store_bytes(store, key: str) -> bytes:
    with store.fs.open_input_stream(store._path(key)) as f:
        return f.read()
