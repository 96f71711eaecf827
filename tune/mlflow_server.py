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
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dilm import DilmError
from tune.auth import Credentials, server_env
from tune.tracking import stop_group


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_command(backend_uri: str, artifacts: Path, host: str, port: int, auth: bool = False) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--serve-artifacts",
            "--artifacts-destination", str(artifacts), "--host", host, "--port", str(port), "--workers", "1",
            "--allowed-hosts", f"{host},{host}:{port},localhost,localhost:{port},127.0.0.1,127.0.0.1:{port}",
            *(["--app-name", "basic-auth"] if auth else [])]


@dataclass
class TrackingServer:
    """A running ``mlflow server``; ``url`` is what trials log to."""

    proc: subprocess.Popen
    url: str
    private: Path | None = None  # the auth config and user database (basic-auth only)

    @classmethod
    def start(cls, backend_uri: str, artifacts: Path, host: str, log: Path | None = None,
              timeout_s: float = 120, admin: Credentials | None = None) -> TrackingServer:
        """Serve ``backend_uri`` on a free port of ``host`` and wait until it answers ``/health``; with ``admin``,
        only that user may use it (basic-auth, see the module docstring)."""
        port = free_port(host)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        private = Path(tempfile.mkdtemp(prefix="dilm-mlflow-auth-")) if admin else None
        if admin:
            env.update(server_env(admin, private))
        log = log or Path(os.devnull)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(server_command(backend_uri, artifacts, host, port, auth=admin is not None),
                                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        server = cls(proc, f"http://{host}:{port}", private)
        deadline = time.monotonic() + timeout_s
        while not server.healthy():
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise DilmError(f"the MLflow server for {backend_uri} did not start on {server.url} (log: {log})")
            time.sleep(0.5)
        return server

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        stop_group(self.proc)
        if self.private is not None:
            shutil.rmtree(self.private, ignore_errors=True)
