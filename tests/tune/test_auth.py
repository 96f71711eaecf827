"""The tracking server the driver serves lets only the sweep's own user in (tune/auth.py, tune/mlflow_server.py)."""

from __future__ import annotations

import json
import os
import stat
import time
import urllib.error
import urllib.request

import pytest

from tune.auth import PASSWORD_ENV, USERNAME_ENV, Credentials, client_env, save_login, with_credentials


def test_credentials_hide_their_password_and_reach_the_trial_env(tmp_path, monkeypatch):
    creds = Credentials.generate()
    assert len(creds.password) >= 32 and creds.password != Credentials.generate().password
    assert creds.password not in repr(creds) and creds.password not in str(creds)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)

    def run_trial(config, plan):
        return os.environ[USERNAME_ENV], os.environ[PASSWORD_ENV], plan

    wrapped = with_credentials(run_trial)
    assert wrapped.__name__ == "run_trial"  # Tune checks a restored sweep's trainable by name
    assert wrapped({}, plan="p", credentials=creds) == ("dilm", creds.password, "p")
    monkeypatch.setenv(PASSWORD_ENV, "before")
    with client_env(creds):
        assert os.environ[PASSWORD_ENV] == creds.password
    assert os.environ[PASSWORD_ENV] == "before"
    login = save_login(tmp_path / "secrets" / "s.mlflow-login", "http://h:1", creds)
    assert stat.S_IMODE(login.stat().st_mode) == 0o600 and stat.S_IMODE(login.parent.stat().st_mode) == 0o700


def status(url: str, data: dict | None = None, auth: tuple[str, str] | None = None) -> int:
    import base64

    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                 headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    from tune.mlflow_server import TrackingServer

    root = tmp_path_factory.mktemp("served")
    admin = Credentials.generate()
    server = TrackingServer.start(f"sqlite:///{root / 'mlflow.db'}", root / "mlartifacts", "127.0.0.1",
                                  log=root / "mlflow-server.log", admin=admin)
    yield server, admin, root
    server.stop()


@pytest.mark.slow  # ~30 s: an mlflow server's start and stop
def test_the_served_store_refuses_requests_without_the_sweeps_password(auth_server, tmp_path):
    from mlflow.tracking import MlflowClient

    server, admin, root = auth_server
    search = f"{server.url}/api/2.0/mlflow/runs/search"
    assert status(f"{server.url}/health") == 200
    assert status(search, {}) == 401
    assert status(search, {}, ("dilm", "not-the-password")) == 401
    assert status(server.url + "/", None) == 401  # the UI too
    (tmp_path / "a.txt").write_text("artifact")
    with client_env(admin):  # what the driver and each trial do
        client = MlflowClient(tracking_uri=server.url)
        exp = client.create_experiment("auth")
        run = client.create_run(exp, tags={"t": "v"}).info.run_id
        client.log_param(run, "p", 1)
        client.log_artifact(run, str(tmp_path / "a.txt"))  # through the server's artifact proxy
        assert [a.path for a in client.list_artifacts(run)] == ["a.txt"]
    secret = admin.password.encode()
    assert server.private is not None and server.private.is_dir()
    leaked = [p for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert not leaked  # neither the store, the artifacts nor the server's log
    server_ini = (server.private / "basic_auth.ini").read_text()
    assert admin.password not in server_ini


def within(seconds: float, condition) -> bool:
    """Whether ``condition()`` holds within ``seconds`` (polled every 50 ms)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.slow  # ~25 s: a server started, killed and started again
def test_a_killed_tracking_server_is_restarted_and_a_client_waits_for_it(tmp_path):
    """The fault "tracking server killed" (docs/clusters.md): the driver's watch starts it again on the same URL with
    the same user, and a request made while it is down (a trial logging) is retried by MLflow's client until it
    answers. A server that no longer starts is one warning, and the watch ends."""
    import signal
    import sys

    from mlflow.tracking import MlflowClient

    from tune.mlflow_server import TrackingServer

    admin, said = Credentials.generate(), []
    server = TrackingServer.start(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlartifacts", "127.0.0.1",
                                  log=tmp_path / "mlflow-server.log", admin=admin)
    try:
        watch = server.watch(every_s=0.5, say=lambda line, **_: said.append(line))
        with client_env(admin):
            client = MlflowClient(tracking_uri=server.url)
            experiment = client.create_experiment("restart")
            first = server.proc.pid
            os.killpg(first, signal.SIGKILL)  # the server and its uvicorn worker: kill -9, the OOM killer
            assert within(10, lambda: not server.healthy())  # its port refuses connections: it is down
            run = client.create_run(experiment).info.run_id  # refused, retried, answered by the new server
            client.log_param(run, "p", 1)
            assert client.get_run(run).data.params == {"p": "1"}
        # the client may be answered up to one health poll before the watch counts the restart
        assert within(10, lambda: said) and server.restarts == 1 and server.proc.pid != first
        assert status(f"{server.url}/api/2.0/mlflow/runs/search", {}) == 401  # still the sweep's user only
        assert said == [f"warning: the MLflow server stopped; restarted on {server.url}"]

        server.command = [sys.executable, "-c", "raise SystemExit(3)"]  # e.g. its store became unreachable
        os.killpg(server.proc.pid, signal.SIGKILL)
        watch.join(timeout=60)
        assert not watch.is_alive() and server.restarts == 1 and len(said) == 2
        assert said[1].startswith("warning: the MLflow server stopped and could not be restarted: the MLflow server "
                                  f"did not start on {server.url} (log: ")
    finally:
        server.stop()
    assert server.proc.poll() is not None
