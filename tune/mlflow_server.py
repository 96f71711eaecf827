"""An MLflow tracking server on the driver's machine, for sweeps whose trials run on other nodes.

A sqlite store is a file of one machine: trials elsewhere cannot log to it. When ``$MLFLOW_TRACKING_URI`` is unset and
the storage is a URI or the cluster has (or, autoscaling, will have) more than one node, the driver serves its store
over HTTP instead (:func:`tune.sweep.start_tracking`): ``mlflow server`` with the sqlite backend in the driver's folder
and ``--serve-artifacts`` (trials upload artifacts through the server into ``mlartifacts/`` beside the database).

The server runs in its own process group and is stopped by it (killing only the ``mlflow`` pid leaves its workers);
``--workers 1`` and ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` start it in seconds. ``--allowed-hosts`` names the
address trials use: MLflow 3 refuses other Host headers than localhost and private ranges with a 403.

With ``admin`` credentials (what the driver does: :mod:`tune.auth`) the server runs MLflow's ``basic-auth`` app: a
request without that user's password gets 401 (``/health`` aside, which the start waits on). Its auth config and
user database live in a private temporary folder removed when the server stops.

Should the server die while a sweep runs (killed, out of memory), :meth:`TrackingServer.watch` starts it again on the
same port with the same users: the trials' requests retry meanwhile (``tests/tune/test_auth.py``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dilm import DilmError
from tune.auth import Credentials, server_env
from tune.database import masked

# `mlflow server --backend-store-uri` read from the environment: a tracking database's password stays off the
# command line, which every user of the machine sees in `ps`
BACKEND_ENV = "MLFLOW_BACKEND_STORE_URI"


def stop_group(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM to the process group ``proc`` leads (started with ``start_new_session``), SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with contextlib.suppress(ProcessLookupError):  # children that outlived the leader
        os.killpg(proc.pid, signal.SIGKILL)


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_command(artifacts: Path, host: str, port: int, auth: bool = False) -> list[str]:
    """The server's command line; the backend store goes in its environment (:data:`BACKEND_ENV`)."""
    return [sys.executable, "-m", "mlflow", "server", "--serve-artifacts",
            "--artifacts-destination", str(artifacts), "--host", host, "--port", str(port), "--workers", "1",
            "--allowed-hosts", f"{host},{host}:{port},localhost,localhost:{port},127.0.0.1,127.0.0.1:{port}",
            *(["--app-name", "basic-auth"] if auth else [])]


@dataclass
class TrackingServer:
    """A running ``mlflow server``; ``url`` is what trials log to. :meth:`watch` restarts it should it die."""

    proc: subprocess.Popen | None
    url: str
    private: Path | None = None  # the auth config and user database (basic-auth only)
    command: list[str] = field(default_factory=list, repr=False)
    env: dict[str, str] = field(default_factory=dict, repr=False)  # the admin's and the database's passwords
    log: Path = Path(os.devnull)
    restarts: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stopped: threading.Event = field(default_factory=threading.Event, repr=False)

    @classmethod
    def start(cls, backend_uri: str, artifacts: Path, host: str, log: Path | None = None,
              timeout_s: float = 120, admin: Credentials | None = None) -> TrackingServer:
        """Serve ``backend_uri`` on a free port of ``host`` and wait until it answers ``/health``; with ``admin``,
        only that user may use it (basic-auth, see the module docstring)."""
        port = free_port(host)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", BACKEND_ENV: backend_uri}
        env.pop("MLFLOW_TRACKING_URI", None)
        private = Path(tempfile.mkdtemp(prefix="dilm-mlflow-auth-")) if admin else None
        if admin:
            env.update(server_env(admin, private))
        log = log or Path(os.devnull)
        log.parent.mkdir(parents=True, exist_ok=True)
        server = cls(None, f"http://{host}:{port}", private, server_command(artifacts, host, port, admin is not None),
                     env, log)
        try:
            server._launch(timeout_s)
        except DilmError:
            server.stop()
            raise DilmError(f"the MLflow server for {masked(backend_uri)} did not start on {server.url} "
                            f"(log: {log})") from None
        return server

    def _launch(self, timeout_s: float = 120) -> None:
        """Start the command and wait for ``/health`` (the same port, users and store each time)."""
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                stop_group(self.proc)
                raise DilmError(f"the MLflow server did not start on {self.url} (log: {self.log})")
            time.sleep(0.5)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def watch(self, every_s: float = 5, say=print) -> threading.Thread:
        """Until :meth:`stop`, restart the server whose process ended (killed, out of memory; its uvicorn worker
        ending ends it too): its whole process group stopped, then the same command on the same port with the same
        users, so the trials' URL and credentials stay valid. MLflow's client retries a failed request (7 times,
        backoff doubling from 2 s: minutes) and a restart takes seconds: a trial logging meanwhile waits. A server
        that is slow to answer is left alone: restarting it would fail the requests it is serving. One that cannot
        be started again is one warning, and the watch ends (a store that fails each start would fail each retry)."""

        def loop() -> None:
            while not self._stopped.wait(every_s):
                if self.proc.poll() is None:
                    continue
                with self._lock:
                    if self._stopped.is_set():
                        return
                    stop_group(self.proc)
                    try:
                        self._launch()
                    except DilmError as e:
                        say(f"warning: the MLflow server stopped and could not be restarted: {e}", file=sys.stderr,
                            flush=True)
                        return
                    self.restarts += 1
                say(f"warning: the MLflow server stopped; restarted on {self.url}", file=sys.stderr, flush=True)

        thread = threading.Thread(target=loop, name="mlflow-server-watch", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:  # not while a restart is under way
            if self.proc is not None:
                stop_group(self.proc)
        if self.private is not None:
            shutil.rmtree(self.private, ignore_errors=True)
