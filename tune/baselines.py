"""Baselines beside every sweep: what the best trial must beat, scored on the same evaluation pool at the same DPCs.

* ``random`` — ``n_sets`` random real sets per DPC (:func:`dilm.coreset.build_coresets`, method ``random``);
* ``vanilla`` — the shared LM-stage checkpoint sampled and selected exactly as a trial's final sets are, without
  matching (``outer_loops = 0`` from the same checkpoint, same ``n_sets``, DPCs and selection);
* ``kcenters`` and ``herding`` — the two real selections the method must beat (the reference's k-centers:
  nearest the k-means centroids; herding: the running mean kept at the class mean, the strongest measured,
  ``bench/results/2026-12-01-cpu-quality-selection.md``), on the learner's mean-pooled features; ``n_sets`` sets
  per DPC, set k chosen from its own seeded random half of each class (:data:`HALF_SAMPLE` of it read), so
  these deterministic methods get a spread and an interval like the others;
* ``full`` — the full-data reference: the protocol trained on the whole training split, or a stratified sample of
  :data:`dilm.coreset.FULL_SAMPLE` examples of a larger one (:func:`dilm.coreset.full_data_set`); it does not depend
  on DPC, so it is scored once and stands beside every DPC.

Each is one MLflow run in the sweep's experiment, nested under the parent run, tagged ``baseline=<name>``, with the
same metric names as a trial (``accuracy/<arch>/dpc<d>``, ``accuracy_std/...``, ``objective``). Their sets and
scores live in ``sets/<name>/baselines/<baseline>/``; a resumed sweep reuses scores already there.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import ray
from mlflow.entities import RunTag

from dilm.coreset import CoresetConfig, build_coresets, full_data_set
from dilm.device import use_cpu_threads
from dilm.distill import LM_META, DistillConfig, distill
from dilm.synset import read_set
from dilm.tasks import load_task
from tune.pool import PoolClient, PoolSpec
from tune.scores import BASELINES, FULL, OBJECTIVE, ScoreTable, objective, score_metrics
from tune.storage import Staged, cached_folder, node_cache, open_storage, split
from tune.tracking import PARENT_TAG, SWEEP_TAG, SweepTracker

BASELINE_TAG = "baseline"
HALF_SAMPLE = 1000  # real examples per class and half that kcenters and herding read (MiniLM features, one thread)


def baseline_sets(name: str, cfg: DistillConfig, lm_checkpoint: str | None, out: str,
                  cpu: float | None = None) -> dict[int, list]:
    """{dpc: [SynSet]} of one baseline at the trials' DPCs and ``n_sets``, with torch threads for ``cpu`` CPUs (at
    least one). ``lm_checkpoint`` and ``out`` are locations (folders, or URIs: the checkpoint is fetched to this node,
    the vanilla run's folder published)."""
    use_cpu_threads(cpu)  # a reused worker keeps its last task's thread count otherwise
    task = load_task(cfg.task)
    if name == "random":
        return build_coresets(task, CoresetConfig(method="random", dpc=tuple(cfg.dpc), n_sets=cfg.n_sets,
                                                  seed=cfg.seed))
    if name == FULL:
        return {d: [full_data_set(task, seed=cfg.seed)] for d in cfg.dpc}
    if name in ("kcenters", "herding"):
        return build_coresets(task, CoresetConfig(method=name, dpc=tuple(cfg.dpc), n_sets=cfg.n_sets, seed=cfg.seed,
                                                  learner=cfg.learner, pooling="mean", device=cfg.device,
                                                  candidates_per_class=HALF_SAMPLE, halves=True))
    folder = Staged(out, name)
    if lm_checkpoint:
        parent, key = split(lm_checkpoint)
        lm_checkpoint = str(cached_folder(open_storage(parent), key, LM_META, node_cache("lm")))
    vanilla = dataclasses.replace(cfg, outer_loops=0, lm_checkpoint=lm_checkpoint or "", output_dir=str(folder.path))
    result = distill(vanilla, task=task)  # the task already loaded
    sets = {d: [read_set(p, task.label_names, task.is_pair) for p in paths] for d, paths in result.sets.items()}
    folder.publish(skip=["checkpoint"])
    return sets


def run_baselines(cfg: DistillConfig, lm_checkpoint: str | None, pool: PoolSpec, tracker: SweepTracker,
                  out_dir: str, resources, objective_archs: tuple[str, ...] = ()) -> dict[str, ScoreTable]:
    """Score every baseline on the pool and log it as a tagged MLflow run; {baseline: {dpc: {arch: summary}}}.
    The sets are built by Ray tasks with ``resources`` (the sweep's ``baseline_resources``, by default a trial's: the
    vanilla LM samples where a trial would)."""
    make_sets = ray.remote(**resources.as_remote())(baseline_sets)
    store, out = open_storage(out_dir), {}
    done = {name: f"{name}/scores.json" for name in BASELINES}
    for name in BASELINES:
        if store.exists(done[name]):  # resumed sweep: already scored and logged
            out[name] = {int(d): s for d, s in store.read_json(done[name]).items()}
    # every missing baseline's sets are built at once (as many tasks as fit), each scored as soon as it is there
    building = {name: make_sets.remote(name, cfg, lm_checkpoint, out_dir, resources.cpu)
                for name in BASELINES if name not in out}
    for name, ref in building.items():
        sets = ray.get(ref)
        if name == FULL:  # the same set at every DPC: scored once, shown beside each
            first = min(sets)
            once = PoolClient(pool).score({first: sets[first]})[first]
            scores = {d: once for d in sets}
        else:
            scores = PoolClient(pool).score(sets)
        log_baseline(tracker, name, scores, lm_checkpoint, objective_archs)
        store.write_json(done[name], {str(d): s for d, s in scores.items()})
        out[name] = scores
    return {name: out[name] for name in BASELINES}


def start_baselines(*args, **kwargs) -> Callable[[], dict[str, ScoreTable]]:
    """:func:`run_baselines` in a background thread of the driver (:func:`in_background`), so that the baselines are
    built and scored while the trials run: they need only the LM checkpoint and the pool, and the CPU time the trials
    leave idle (a stopped trial's slot, the last trial's wait for its scores) builds them."""
    return in_background(run_baselines, *args, **kwargs)


def in_background(fn: Callable, *args, **kwargs) -> Callable:
    """Start ``fn(*args, **kwargs)`` in a daemon thread; returns ``result()``, which waits for it and returns its
    value or raises its error. A daemon: a driver stopped before ``result()`` does not wait for it."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised by result(), in the caller's thread
            out["error"] = e

    thread = threading.Thread(target=run, name=f"dilm-{fn.__name__}", daemon=True)
    thread.start()

    def result():
        thread.join()
        if "error" in out:
            raise out["error"]
        return out["value"]
    return result


def log_baseline(tracker: SweepTracker, name: str, scores: ScoreTable, lm_checkpoint: str | None,
                 objective_archs: tuple[str, ...] = ()) -> None:
    spec, client = tracker.spec, tracker.client
    run = client.create_run(spec.experiment_id, run_name=f"baseline {name}", tags={
        PARENT_TAG: spec.parent_run_id, SWEEP_TAG: spec.sweep, BASELINE_TAG: name})
    if name == "vanilla" and lm_checkpoint:
        client.log_batch(run.info.run_id, tags=[RunTag("dilm.lm_checkpoint", lm_checkpoint)])
    # the full-data reference is a ceiling, not a rival: no objective, so the sweep's runs view (best objective
    # first) opens on the winning trial, the reference after the runs that have one
    ranked = {} if name == FULL else {OBJECTIVE: objective(scores, objective_archs)}
    for k, v in {**score_metrics(scores), **ranked}.items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id, "FINISHED")
