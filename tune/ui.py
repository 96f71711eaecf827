"""``dilm ui`` (``python -m tune.ui``): the sweeps' MLflow store served by ``mlflow ui`` until Ctrl-C, with the link
to each sweep's runs page printed first (:func:`runs_links`).

The store is the one the sweeps log to (:mod:`tune.tracking`): ``--backend-store-uri``, else ``$MLFLOW_TRACKING_URI``,
else ``mlflow.db`` in the sweep storage; a tracking server is not served again (its URL is printed). The UI runs in its
own process group, stopped as a whole by Ctrl-C or SIGTERM (:func:`tune.mlflow_server.stop_group`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from dilm import DilmError
from dilm.options import Parser
from tune.database import masked, with_driver
from tune.mlflow_server import stop_group
from tune.tracking import VIEW_TAG, default_storage, sqlite_path, tracking_uri

ML_VIEW = "workflowType=machine_learning"  # MLflow 3 opens its GenAI view without this in the URL


def view_url(base: str, experiment_id: str, parent_run_id: str | None = None) -> str:
    """The runs page of an experiment in the model-training view; with ``parent_run_id``, its sweep's view."""
    key = f"&viewStateShareKey={parent_run_id}" if parent_run_id else ""
    return f"{base}/#/experiments/{experiment_id}/runs?{ML_VIEW}{key}"


def ui_command(uri: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", "1"]


def ui_main(argv: list[str] | None = None) -> int:
    """``dilm ui``: serve the sweeps' MLflow store with ``mlflow ui`` until Ctrl-C."""
    p = Parser(prog="dilm ui", description="MLflow UI over the sweeps' tracking store")
    p.add_argument("--storage", type=Path, default=None,
                   help="sweep storage folder holding mlflow.db (default: $DILM_SWEEP_DIR or ./runs/sweeps)")
    p.add_argument("--backend-store-uri", default=None, help="a store URI instead, e.g. a sweep's --tracking-db "
                   "(default: $MLFLOW_TRACKING_URI or sqlite:////<storage>/mlflow.db)")
    p.add_argument("--host", default="127.0.0.1", help="address the UI listens on (default: 127.0.0.1, this machine "
                   "only)")
    p.add_argument("--port", type=int, default=5000, help="port the UI listens on (default: 5000)")
    args = p.parse_args(argv)
    uri = with_driver(args.backend_store_uri or tracking_uri(args.storage or default_storage()))  # postgresql: psycopg2
    if uri.startswith(("http://", "https://")):
        print(f"the tracking store is a server already: open {uri}")
        return 0
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        raise DilmError(f"no MLflow store at {db}; run a sweep first (dilm sweep) or pass --storage")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI on {base}  (store {masked(uri)}; Ctrl-C stops it)", flush=True)
    for i, (label, url) in enumerate(runs_links(uri, base)):  # MLflow 3 opens an empty traces page otherwise
        print(f"  open {url}   ({label}: the latest)" if i == 0 else f"  {label}: {url}", flush=True)
    # its own process group: mlflow starts workers (huey_consumer, gunicorn/uvicorn) that must stop with it
    proc = subprocess.Popen(ui_command(uri, args.host, args.port), env=env, start_new_session=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)  # SIGTERM to `dilm ui` stops the server too
    try:
        return proc.wait()
    except KeyboardInterrupt:
        stop_group(proc)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def runs_links(uri: str, base: str) -> list[tuple[str, str]]:
    """(label, url): each sweep's view (:func:`view_url`), the latest first, then the runs page of every other
    experiment of the store holding runs."""
    client = MlflowClient(tracking_uri=uri)
    sweeps, others = [], []
    for e in client.search_experiments():
        parents = [k[len(VIEW_TAG):] for k in e.tags if k.startswith(VIEW_TAG)]
        ids = ", ".join(f"'{p}'" for p in parents)
        runs = client.search_runs([e.experiment_id], f"attributes.run_id IN ({ids})") if parents else []
        sweeps += [(r.info.start_time, f"sweep {r.info.run_name} ({e.name})",
                    view_url(base, e.experiment_id, r.info.run_id)) for r in runs]
        if not runs and client.search_runs([e.experiment_id], max_results=1):
            others.append((e.name, view_url(base, e.experiment_id)))
    return [(label, url) for _, label, url in sorted(sweeps, reverse=True)] + others


if __name__ == "__main__":
    try:
        sys.exit(ui_main())
    except DilmError as e:
        print(f"dilm ui: error: {e}", file=sys.stderr)
        sys.exit(2)
