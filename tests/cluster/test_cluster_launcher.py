"""The cluster launcher path as a user drives it (docs/clusters.md#cluster-launcher): ``ray up`` of
``cluster/local.yaml`` against an SSH server on this machine, ``ray submit`` of ``cluster/sweep.py`` and ``ray exec``
of the smoke sweep, ``ray down``, and nothing left running.

Exclusive: the YAML keeps Ray's local start commands, which begin with ``ray stop``, and ``ray down`` runs ``ray stop``
as well; both kill every Ray process on the machine. The test skips when another Ray runs here; run it alone:

    flock /tmp/dilm-ray.lock .venv/bin/python -m pytest tests/cluster/test_cluster_launcher.py -m slow

The "remote" node is this machine: a private ``sshd`` on 127.0.0.1:22 (root only: port 22, and its sessions log in as
the test's user) whose sessions get a throwaway ``HOME`` (``SetEnv``), so ``~/dilm``, ``~/.bashrc``, ``~/sweep.py``
and Ray's ``~/ray_bootstrap_*`` land in a temporary folder, not in the real home. Of ``cluster/local.yaml`` only the
addresses, the user, the key and the setup are replaced; the setup activates this checkout's venv instead of building
``~/venv`` (minutes of downloads; the YAMLs' recipe is checked offline by tests/cluster/test_cluster.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
RAY_DAEMONS = ("raylet", "gcs_server")
CLUSTER = "dilm-onprem"  # cluster/local.yaml's cluster_name (kept)


def ray_daemons() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            words = " ".join(p.info["cmdline"] or [p.info["name"] or ""])
            if any(d in words for d in RAY_DAEMONS):
                found.append(p)
    return found


def why_not() -> str | None:
    """The one-line reason this machine cannot run the test, else None."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (a private sshd on 127.0.0.1:22 logging in as the test's user)"
    missing = [t for t in ("sshd", "ssh", "ssh-keygen", "rsync") if not shutil.which(t, path="/usr/sbin:/usr/bin")]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install openssh-server rsync)"
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 22)) == 0:
            return "127.0.0.1:22 is taken by another SSH server"
    if ray_daemons():
        return "another Ray runs on this machine, and `ray up`/`ray down` here run `ray stop`, which would kill it"
    return None


def start_sshd(root: Path, home: Path, user_key: Path) -> subprocess.Popen:
    host_key = root / "host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    (root / "authorized_keys").write_text(Path(f"{user_key}.pub").read_text())
    (root / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1:22\nHostKey {host_key}\nPidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nSetEnv HOME={home}\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder (the package's service makes it)
    with open(root / "sshd.log", "w") as log:
        sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(root / "sshd_config")], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", 22)) == 0:
                return sshd
        assert sshd.poll() is None and time.monotonic() < deadline, (root / "sshd.log").read_text()
        time.sleep(0.2)


def cluster_yaml(root: Path, key: Path) -> Path:
    """cluster/local.yaml with only the addresses, the user, the key and the setup replaced."""
    cfg = yaml.safe_load((ROOT / "cluster" / "local.yaml").read_text())
    cfg["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    cfg["auth"] = {"ssh_user": "root", "ssh_private_key": str(key)}
    cfg["setup_commands"] = [  # this checkout's venv stands for ~/venv; the env is the test suite's
        f"echo 'source {VENV_BIN}/activate; export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true "
        "HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false' >> ~/.bashrc"]
    path = root / "local.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def leftovers(root: Path, home: Path) -> list[str]:
    """Processes of this test still alive: whatever the SSH sessions started (their HOME is ours: Ray's daemons, the
    sweeps) or names our folder (sshd, ssh's connection masters)."""
    left = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.pid != os.getpid() and (str(root) in cmd or p.environ().get("HOME") == str(home)):
                left.append(f"{p.pid} {cmd[:120]}")
    return left


def check_sweep(out: str, storage: Path, name: str) -> None:
    """What docs/sweeps.md#storage says lands under the storage, and the summary README.md describes."""
    from mlflow.tracking import MlflowClient

    assert f"sweep {name}: storage {storage}\n" in out, out[-4000:]
    assert f"sweep {name}: 3 complete" in out and f"  storage:   {storage}\n" in out, out[-4000:]
    assert {"mlflow.db", "optuna.db", "tune", "sets", "reports", "state"} <= {p.name for p in storage.iterdir()}
    sets = storage / "sets" / name
    assert len(list(sets.glob("*/final.json"))) == 3  # the 3 trials; the baselines beside them in baselines/
    assert {"random", "vanilla", "herding"} <= {p.name for p in (sets / "baselines").iterdir()}
    assert len({p.parent.parent.parent for p in sets.glob("*/sets/dpc*/set*.jsonl")}) == 3
    assert (storage / "reports" / name / "trials.csv").is_file()
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    parent = client.get_run(json.loads((storage / "state" / f"{name}.json").read_text())["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert all(c.info.status == "FINISHED" for c in children)
    trials = [c for c in children if "dilm.trial_id" in c.data.tags]
    assert len(trials) == 3 and sum(c.data.tags.get("dilm.best") == "true" for c in trials) == 1
    baselines = {c.data.tags.get("baseline") for c in children if "dilm.trial_id" not in c.data.tags}
    assert {"herding", "random", "vanilla"} <= baselines  # the baselines' runs beside the trials


@pytest.mark.slow
def test_ray_up_submit_exec_down():
    reason = why_not()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="dilm-ssh-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    home = root / "home"
    home.mkdir()
    key = root / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    config = cluster_yaml(root, key)
    state = Path(tempfile.gettempdir()) / "ray" / f"cluster-{CLUSTER}.state"  # the local provider's node list
    current = state.with_name("ray_current_cluster")  # the address `ray start --head` leaves for bare ray.init()
    had_state, had_current = state.exists(), current.exists()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "DILM_SWEEP_DIR")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    log = []

    def ray(*args: str, timeout: float = 900, check: bool = True) -> str:
        t = time.monotonic()
        run = subprocess.run([str(VENV_BIN / "ray"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=timeout)
        out = run.stdout + run.stderr
        log.append(f"ray {args[0]}: rc {run.returncode}, {time.monotonic() - t:.0f} s")
        assert run.returncode == 0 or not check, f"ray {' '.join(args)}\n{out[-6000:]}"
        return out

    if ray_daemons():  # once more, just before: the head's start commands begin with `ray stop`
        pytest.skip("another Ray started on this machine meanwhile; `ray up` here would stop it")
    sshd = start_sshd(root, home, key)
    storage = home / "dilm" / "runs" / "sweeps"  # the default ./runs/sweeps, in the synced repository
    try:
        ray("up", "-y", "--no-config-cache", str(config))
        assert (home / "dilm" / "tune" / "sweep.py").is_file()
        # = ray submit cluster/local.yaml cluster/sweep.py -- --config sweeps/smoke.yaml
        out = ray("submit", "--no-config-cache", str(config), "cluster/sweep.py", "--", "--config", "sweeps/smoke.yaml")
        check_sweep(out, storage, "smoke")
        out = ray("exec", "--no-config-cache", str(config),
                  "cd ~/dilm && python -m tune.sweep --config sweeps/smoke.yaml --name smoke-exec")
        check_sweep(out, storage, "smoke-exec")
    finally:
        try:
            down = ray("down", "-y", str(config), timeout=300, check=False)
        finally:
            os.killpg(sshd.pid, 15)
            sshd.wait(timeout=30)
            deadline = time.monotonic() + 30  # ssh's ControlPersist masters close a few seconds after the last use
            while leftovers(root, home) and time.monotonic() < deadline:
                time.sleep(1)
            left = leftovers(root, home)
            if not had_state:
                state.unlink(missing_ok=True)
            if not had_current:
                current.unlink(missing_ok=True)
            print("\n".join([*log, f"total {time.monotonic() - started:.0f} s"]))
    assert log[-1].startswith("ray down: rc 0"), down[-6000:]
    assert not left, "still running after ray down:\n" + "\n".join(left)
    shutil.rmtree(root, ignore_errors=True)
