"""Hyperparameter sweeps of DiLM distillation — the driver: Ray Tune trials, Optuna TPE search, ASHA early stopping,
MLflow tracking.

    python -m tune.sweep --config sweeps/sst2.yaml [--smoke] [--resume] [--name N] [--storage DIR]   (= dilm sweep)

Vocabulary
  * **sweep** — one named search described by a YAML file (:class:`tune.config.SweepConfig`; storage layout in
    :mod:`tune.config`).
  * **trial** — one ``distill(cfg)`` with sampled values, then its sets scored on the evaluation pool
    (:func:`tune.trial.run_trial`), on a resource share (``tune.with_resources``; fractional GPUs allowed).
  * **objective** — the trial's final metric: mean test accuracy (%) over the pool's architectures and the DPCs.
  * **validation accuracy** — ``val_accuracy`` reported by distill every ``val_interval`` outer loops; the
    intermediate signal on which ASHA stops trials early (how Optuna is told: :mod:`tune.search`).

:func:`run_sweep` in order: refuse to overwrite or to resume with another YAML, connect to Ray, check that the pool
and a trial fit the cluster, open the MLflow parent run, start the evaluation pool (:mod:`tune.pool`), start the
baselines beside the trials (:func:`tune.baselines.start_baselines`), run or restore the Tuner, then summarise from
the Optuna study (:mod:`tune.report`) with the baselines.

Fault tolerance: ``FailureConfig(max_failures)`` retries a failing trial (distill resumes from its checkpoint in the
trial's output folder); a trial that still fails is recorded (Tune error, MLflow child FAILED, Optuna FAIL) and the
sweep goes on. A driver killed even by SIGKILL resumes with ``--resume`` (``Tuner.restore(resume_errored=True)``
and the same Optuna study); a trial that had written its ``final.json`` reports it again instead of re-running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path

import ray
from ray.tune import FailureConfig, RunConfig, TuneConfig, Tuner, with_parameters, with_resources

from dilm import GIT_REVISION_ENV, DilmError, git_revision
from dilm.distill import LM_KEYS, DistillConfig
from dilm.files import write_json
from dilm.options import Parser
from tune.auth import Credentials, client_env, login_file, save_login, with_credentials
from tune.baselines import start_baselines
from tune.config import Resources, SweepConfig, SweepPaths, in_ray_job, load_config
from tune.data import pinned_task, published
from tune.database import connect, gone, masked
from tune.mlflow_server import TrackingServer
from tune.pool import PoolError, PoolSpec, create_pool, shutdown_pool
from tune.publish import Publisher, attach
from tune.report import ORPHAN, add_baselines, fail_orphans, load_study, report_summary, summarize
from tune.resume import check_same_config, damaged, own_store, read_state, same_store, study_exists
from tune.search import (
    PruneAwareOptunaSearch,
    TrialEnd,
    end_left_running,
    make_scheduler,
    make_searcher,
    optuna_storage_at,
    trial_dirname,
)
from tune.stop import RESUME_HINT, keep_sigterm_handler, sigterm_as_interrupt, watch_tune_stop
from tune.storage import join, open_storage, sync_down, sync_up
from tune.tracking import SweepTracker, TrackingSpec, flatten
from tune.trial import TrialPlan, run_trial, train_lm_alone

# These lived in this module before tune/sweep.py was split, and Tune pickled them by that qualified name
# (tune.sweep.X) into each experiment's tuner.pkl (searcher, callback, trial_dirname_creator): `--resume` of such a
# sweep unpickles them from here. Keep all three importable from tune.sweep (tests/tune/test_sweep.py checks it on a
# tuner.pkl of that time).
PICKLED_BY_OLD_SWEEPS = (PruneAwareOptunaSearch, TrialEnd, trial_dirname)


def check_resources(cfg: SweepConfig, cluster: dict) -> list[str]:
    """Fail fast (DilmError) when the pool plus one trial can never fit in ``cluster`` (``ray.cluster_resources()``);
    return warnings when fewer than ``max_concurrent_trials`` fit. Arithmetic: see :mod:`tune.pool`."""
    cpu, gpu = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    actors, a, t = cfg.eval.actors, cfg.eval.actor_resources, cfg.trial_resources
    pool_cpu, pool_gpu = actors * a.cpu, actors * a.gpu
    have = f"the Ray cluster has {cpu:g} CPU and {gpu:g} GPU"
    if (t.gpu or pool_gpu) and not gpu:
        raise DilmError(f"the sweep asks for GPUs (trial {t.gpu:g}, pool {pool_gpu:g}) but {have}; "
                        "use --smoke, or a config whose trials and eval pool ask for no GPU")
    missing = sorted(k for k, v in {**a.custom, **t.custom}.items() if v > float(cluster.get(k, 0)) + 1e-9)
    if missing:
        raise DilmError(f"the sweep asks for custom resource(s) {missing} that no node of the Ray cluster has "
                        "enough of (`ray start --resources '{\"NAME\": N}'` gives a node some)")
    if pool_cpu + t.cpu > cpu + 1e-9 or pool_gpu + t.gpu > gpu + 1e-9:
        raise DilmError(f"the pool ({actors} x {a.cpu:g} CPU, {a.gpu:g} GPU) plus one trial ({t.cpu:g} CPU, "
                        f"{t.gpu:g} GPU) do not fit: {have}")
    fit = [(cpu - pool_cpu) / t.cpu if t.cpu else math.inf, (gpu - pool_gpu) / t.gpu if t.gpu else math.inf]
    concurrent = int(min(fit) + 1e-9)
    if concurrent < cfg.max_concurrent_trials:
        return [f"only {concurrent} of max_concurrent_trials={cfg.max_concurrent_trials} trials fit beside the "
                f"evaluation pool ({have}); Tune will run {concurrent} at a time"]
    return []


def connect_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Attach to a running cluster (``--address``, $RAY_ADDRESS, or one started by ``ray start``), else start a
    local one without the dashboard. Inside ``ray job submit`` the job's cluster is used."""
    if ray.is_initialized():
        return
    local = address == "local" or (address is None and not os.environ.get("RAY_ADDRESS"))
    with keep_sigterm_handler():  # main's, not Ray's (tune.stop)
        ray.init(address=address, include_dashboard=False, namespace="dilm",
                 **({"num_cpus": num_cpus} if local and num_cpus else {}))


def needs_server(paths: SweepPaths, autoscaling: bool) -> bool:
    """Trials on other nodes cannot reach the driver's sqlite file: serve it when the storage is a URI or the
    cluster has (or, autoscaling, will have) more than one node, unless $MLFLOW_TRACKING_URI names a store."""
    if paths.database:  # trials log through the server: the database's password stays with the driver
        return True
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return False
    return paths.remote or autoscaling or sum(1 for n in ray.nodes() if n.get("Alive")) > 1


def start_server(cfg: SweepConfig, paths: SweepPaths) -> tuple[TrackingServer, Credentials]:
    """The driver's store over HTTP on this node's Ray address (:mod:`tune.mlflow_server`), on a free port (a
    resumed sweep hands the new URL to the callback Tune restores: :func:`build_tuner`), for one user whose password
    is made for this run (:mod:`tune.auth`); says how to log in to its UI."""
    admin = Credentials.generate()
    server = TrackingServer.start(paths.mlflow_url, paths.storage / "mlartifacts",
                                  ray.util.get_node_ip_address(), log=paths.storage / "mlflow-server.log", admin=admin)
    server.watch()  # killed mid-sweep: started again on the same URL (tune.mlflow_server)
    login = save_login(login_file(cfg.name, paths.location), server.url, admin)
    print(f"sweep {cfg.name}: MLflow UI {server.url} (while the sweep runs): log in as {admin.username!r} with the "
          f"password in {login} (readable by you only; a new one each run)", flush=True)
    return server, admin


def start_tracking(cfg: SweepConfig, paths: SweepPaths, resume: bool, server: str | None = None) -> SweepTracker:
    """Open (or, resumed, continue) the parent run in the store (``server``: the URL serving it); the state file
    names the store itself, so a resume served on another port still continues the same parent run."""
    state = read_state(paths) if resume else {}
    uri = paths.mlflow_url
    tracker = SweepTracker.start(server or uri, cfg.experiment, cfg.name,
                                 parent_run_id=state.get("parent_run_id") if same_store(state, uri, paths) else None,
                                 tags={"dilm.storage": paths.location, "dilm.git_revision": git_revision(),
                                       "mlflow.note.content": cfg.description})
    write_json(paths.state_file, {"parent_run_id": tracker.spec.parent_run_id, "tracking_uri": masked(uri),
                                  "own_store": uri == own_store(paths),
                                  "experiment_id": tracker.spec.experiment_id, "config": cfg.to_dict(),
                                  **({"tracking_server": server} if server else {})})
    sync_up(paths.store, paths.storage, [f"state/{cfg.name}.json"])
    tracker.log_params(flatten(cfg.to_dict()))
    return tracker


def lm_searched(cfg: SweepConfig) -> list[str]:
    """The searched keys that change the LM stage (then each trial's LM config may differ)."""
    return sorted(set(cfg.search) & {*LM_KEYS, "prompt_template"})


def base_distill_config(cfg: SweepConfig, **override) -> DistillConfig:
    return DistillConfig.from_preset(cfg.preset, **{**cfg.distill_fixed(), **override}, task=cfg.task)


def train_shared_lm(cfg: SweepConfig, paths: SweepPaths) -> str | None:
    """Train the sweep's LM stage once, before any trial starts, as a Ray task with a trial's resources (so it runs
    where a trial would, GPU included); trials then find it by its key and only load it. Returns its location
    (``<storage>/lm/<key>``: a path, or a URI the task published it to). ``None`` when LM keys are searched: the
    trials train one checkpoint per distinct LM config (under the same lock)."""
    if lm_searched(cfg):
        return None
    resources = lm_stage_resources(cfg.trial_resources, ray.nodes())
    task = ray.remote(**resources.as_remote())(train_lm_alone)
    local = ray.get(task.remote(base_distill_config(cfg), paths.lm_location))  # a path of the node that ran it
    return join(paths.lm_location, local.name) if paths.remote else str(local)


def lm_stage_resources(trial: Resources, nodes: list[dict]) -> Resources:
    """A trial's resources with the whole CPUs of the largest live node that has the rest of them: the shared LM
    stage runs alone (before any trial or evaluation actor), so every core of its node is its own."""
    def fits(n: dict) -> bool:
        have = n.get("Resources", {})
        return n.get("Alive", False) and all(have.get(k, 0) >= v for k, v in {"GPU": trial.gpu, **trial.custom}.items())

    cpus = max((int(n["Resources"].get("CPU", 0)) for n in nodes if fits(n)), default=0)
    return dataclasses.replace(trial, cpu=max(trial.cpu, cpus))


def make_plan(cfg: SweepConfig, paths: SweepPaths, label_names: tuple[str, ...], is_pair: bool, pool: PoolSpec,
              tracking: TrackingSpec) -> TrialPlan:
    """What every trial gets from the driver: locations (paths of the storage, or URIs), never a path of the
    driver's own folder when the storage is a URI."""
    return TrialPlan(cfg.task, label_names, is_pair, cfg.preset, cfg.distill_fixed(), paths.sets_location,
                     paths.tune_dir, pool, tracking, cfg.trial_resources.cpu, paths.lm_location,
                     cfg.eval.objective_archs)


def build_tuner(cfg: SweepConfig, paths: SweepPaths, plan: TrialPlan, restore: bool,
                credentials: Credentials | None = None, publisher: Publisher | None = None) -> Tuner:
    """The Tuner of the sweep, new or restored; trials get ``credentials`` for the tracking server through the object
    store (:func:`tune.auth.with_credentials`), ``publisher`` joins the callbacks unpickled (:mod:`tune.publish`)."""
    trainable = with_resources(with_parameters(with_credentials(run_trial), plan=plan, credentials=credentials),
                               cfg.trial_resources.as_tune())
    if restore:  # search algorithm, scheduler and callbacks come back from the experiment's saved state
        try:
            with optuna_storage_at(paths.optuna_url):  # the study where it is now, not where the first head had it
                tuner = Tuner.restore(paths.tune_dir, trainable=trainable, resume_errored=True)
        except Exception as e:  # tuner.pkl cut short or unreadable, its classes gone: one line, not Tune's traceback
            raise damaged(join(paths.tune_dir, "tuner.pkl"), e, "the Ray Tune experiment cannot be restored; start "
                          "the sweep again under another --name") from e
        for callback in tuner._local_tuner._run_config.callbacks or []:  # Ray 2.60 internals
            if isinstance(callback, TrialEnd):  # this run's tracking server: a served store's URL may have changed
                callback.spec = plan.tracking
        if publisher is not None:
            attach(tuner, publisher)
        return tuner
    tune_config = TuneConfig(search_alg=make_searcher(cfg, paths), scheduler=make_scheduler(cfg),
                             num_samples=cfg.num_samples, max_concurrent_trials=cfg.max_concurrent_trials,
                             trial_dirname_creator=trial_dirname)
    run_config = RunConfig(name=cfg.name, storage_path=paths.tune_storage,
                           failure_config=FailureConfig(max_failures=cfg.max_failures),
                           callbacks=[TrialEnd(plan.tracking, plan.sets_dir)])
    tuner = Tuner(trainable, tune_config=tune_config, run_config=run_config)
    if publisher is not None:
        attach(tuner, publisher)
    return tuner


def announce(cfg: SweepConfig, paths: SweepPaths) -> None:
    """Say where the results go (inside a Ray job the working directory is a temporary copy: the user needs the
    absolute path) and warn when the code's revision cannot be recorded."""
    tune_dir = "" if paths.tune_storage == join(paths.location, "tune") else f" (Ray Tune experiment: {paths.tune_dir})"
    mirror = f" (driver's files: {paths.storage})" if paths.remote else ""
    print(f"sweep {cfg.name}: storage {paths.location}{mirror}{tune_dir}", flush=True)
    if in_ray_job() and git_revision() == "unknown":
        print(f"warning: git revision unknown (Ray's copy of the working dir has no .git): submit with "
              f"--runtime-env-json '{{\"env_vars\": {{\"{GIT_REVISION_ENV}\": \"'$(git rev-parse HEAD)'\"}}}}' "
              "to record it in provenance", file=sys.stderr, flush=True)


def run_sweep(cfg: SweepConfig, resume: bool = False, address: str | None = None, num_cpus: int | None = None,
              resource_check: bool = True) -> dict:
    """Run (or, with ``resume``, continue) a sweep; returns the summary (see :func:`tune.report.summarize`)."""
    paths = SweepPaths.of(cfg)
    announce(cfg, paths)
    if paths.database:  # before anything starts: one line if it cannot be used
        check_database(paths)
    fetched = sync_down(paths.store, paths.storage, paths.driver_files())  # a URI storage resumed on a fresh head
    if fetched:
        print(f"sweep {cfg.name}: fetched {', '.join(fetched)} from {paths.location}", flush=True)
    restore = Tuner.can_restore(paths.tune_dir)
    exists = study_exists(paths, cfg.name)  # a damaged database is one line, also on --resume
    if not resume and (restore or exists):
        raise DilmError(f"sweep {cfg.name!r} already exists in {paths.location}: pass --resume to continue it, "
                        "or --name to start another")
    cfg, data = pinned_task(cfg)  # read once here; trials check its hash
    if resume:
        check_same_config(cfg, paths)
    label_names, is_pair = data.label_names, data.is_pair
    run = dataclasses.replace(cfg, task=published(cfg.task, paths))  # what trials read: files by URI if need be
    connect_ray(address, num_cpus)
    if resource_check:
        for warning in check_resources(cfg, ray.cluster_resources()):
            print(f"warning: {warning}", file=sys.stderr)
    server, admin = start_server(cfg, paths) if needs_server(paths, not resource_check) else (None, None)
    status, handles, tracker, publisher, env = "FAILED", [], None, None, contextlib.ExitStack()
    try:
        env.enter_context(client_env(admin))  # the driver's own MLflow client logs as the server's user
        tracker = start_tracking(cfg, paths, resume, server.url if server else None)
        publisher = Publisher(paths.store, paths.storage, paths.driver_files(),
                              f"state/{cfg.name}.published.json") if paths.remote else None
        if publisher is not None:  # as the sweep goes: a fresh head resumes from it (tune.publish)
            publisher.publish()
        lm = train_shared_lm(run, paths)
        if lm is not None:
            tracker.set_tags({"dilm.lm_checkpoint": lm})
        pool, handles = create_pool(run.task, cfg.eval.eval_config(), actors=cfg.eval.actors,
                                    cpu=cfg.eval.actor_resources.cpu, gpu=cfg.eval.actor_resources.gpu,
                                    max_restarts=cfg.eval.max_restarts, retries=cfg.eval.retries,
                                    prefix=f"{cfg.name}-{os.getpid()}-{int(time.time())}",
                                    start_timeout_s=300 if resource_check else 3600)  # autoscaling: nodes boot
        plan = make_plan(run, paths, label_names, is_pair, pool, tracker.spec)
        baselines = start_baselines(base_distill_config(run), lm, pool, tracker, paths.baselines_location,
                                    cfg.baseline_resources or cfg.trial_resources,
                                    cfg.eval.objective_archs)  # beside the trials
        with watch_tune_stop() as stop:
            results = build_tuner(cfg, paths, plan, restore, admin, publisher).fit()
        if (down := gone()) is not None:
            raise down
        finished = (not stop.interrupted  # Ctrl-C, SIGTERM: the trials Tune stopped read TERMINATED
                    and results.num_terminated + results.num_errors == len(results) >= cfg.num_samples)
        study = load_study(cfg, paths)
        if finished:
            for trial_id in fail_orphans(study):  # its child run, if it had one, ends with it
                tracker.end_child(trial_id, "KILLED", {ORPHAN: "true"})
            end_left_running(tracker, study)  # ended while the tracking store was down
        summary = summarize(study, cfg, paths, finished)
        if summary["finished"]:
            mirror_for_report(paths, summary)
            add_baselines(summary, baselines(), paths, run.task)
        report_summary(tracker, summary, paths)
        status = "FINISHED" if summary["finished"] else "KILLED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as e:  # the study's database given up on: that is the line, whatever failed after it
        if (down := gone()) is not None and down is not e:
            raise down from None
        raise
    finally:
        shutdown_pool(handles)
        if tracker is not None and gone() is None:  # else the parent run is left RUNNING, as by a killed driver
            tracker.end(status)
        if server is not None:
            server.stop()
        env.close()
        if publisher is None:
            sync_up(paths.store, paths.storage, paths.driver_files())
        else:  # what changed since its last publish; a failure is one line (the mirror keeps it all)
            publisher.publish()


def check_database(paths: SweepPaths) -> None:
    """The tracking database is reachable, and the only MLflow store named (:mod:`tune.database`)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        raise DilmError(f"tracking_db {masked(paths.database)} and $MLFLOW_TRACKING_URI both name an MLflow store: "
                        "unset one")
    connect(paths.database)


def mirror_for_report(paths: SweepPaths, summary: dict) -> None:
    """A URI storage: fetch the best trial's folder and the vanilla baseline's sets into the driver's folder, where
    the report reads them (a local storage is read in place)."""
    if not paths.remote:
        return
    folders = [paths.baseline_dir("vanilla"), *([paths.trial_dir(summary["best"]["ray_trial_id"])] if summary["best"]
                                                else [])]
    keys = [f.relative_to(paths.sets_dir).as_posix() for f in folders]
    sync_down(open_storage(paths.sets_location), paths.sets_dir, keys)


def build_parser() -> Parser:
    p = Parser(prog="dilm sweep", description="Ray Tune + Optuna sweep of DiLM distillation, tracked in MLflow")
    p.add_argument("--config", required=True, type=Path, help="the sweep's YAML file: task, fixed distill values, "
                   "search space, budgets, eval pool; required")
    p.add_argument("--smoke", action="store_true", help="tiny models, 3 trials, CPU: check the plumbing in minutes "
                   "(default: off)")
    p.add_argument("--resume", action="store_true", help="continue the sweep of this name (start it if new) "
                   "(default: off: an existing sweep is an error)")
    p.add_argument("--name", help="sweep name (default: the YAML's name, else its file name)")
    p.add_argument("--storage", help="state folder (absolute inside a Ray job), or a URI such as s3://BUCKET/dilm "
                   "for nodes without a shared filesystem (default: the YAML's storage, else $DILM_SWEEP_DIR, else "
                   "./runs/sweeps)")
    p.add_argument("--tune-storage", help="Ray Tune experiment location: s3://, gs:// or a shared mount, for "
                   "multi-node sweeps (default: the YAML's tune_storage, else <storage>/tune)")
    p.add_argument("--tracking-db", metavar="URL", help="MLflow's runs and the Optuna study in this PostgreSQL "
                   "database (postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE; the password is masked wherever "
                   "the URL is written) instead of mlflow.db and optuna.db in the storage (default: the YAML's "
                   "tracking_db, else none)")
    p.add_argument("--address", help="Ray cluster address; 'local' starts a private one (default: $RAY_ADDRESS, a "
                   "cluster started by `ray start`, else a new local one)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a newly started local cluster (default: all of this "
                   "machine's)")
    p.add_argument("--autoscaling", action="store_true", help="the cluster adds nodes on demand: skip the check that "
                   "trials fit in the resources present now (default: off)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 some trial complete (a failing trial does not fail the sweep: the summary counts the failed and
    stopped-early ones), 1 none complete (all failed or stopped early, or the sweep interrupted by Ctrl-C before any
    completed), 2 an error before the trials (one line), 130/143 stopped by SIGINT/SIGTERM outside Tune's loop
    (SIGTERM inside it: 143 after the summary)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    name, terminated = args.name or args.config.stem, []
    try:
        with sigterm_as_interrupt(terminated):
            cfg = load_config(args.config, smoke=args.smoke, name=args.name, storage=args.storage,
                              tune_storage=args.tune_storage, tracking_db=args.tracking_db)
            name = cfg.name
            summary = run_sweep(cfg, resume=args.resume, address=args.address, num_cpus=args.num_cpus,
                                resource_check=not args.autoscaling)
    except (DilmError, PoolError) as e:
        print(f"dilm sweep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside Tune's loop (the LM stage, the pool's start), or a second signal
        print(f"sweep {name}: {RESUME_HINT}", file=sys.stderr)
        return 128 + (terminated[0] if terminated else signal.SIGINT)
    if terminated:
        return 128 + terminated[0]
    return 0 if summary["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
