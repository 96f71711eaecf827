"""Baselines beside every sweep: what the best trial must beat, scored on the same evaluation pool at the same DPCs.

* ``random`` — ``n_sets`` random real sets per DPC (:func:`dilm.coreset.build_coresets`, method ``random``);
* ``vanilla`` — the shared LM-stage checkpoint sampled and selected exactly as a trial's final sets are, without
  matching (``outer_loops = 0`` from the same checkpoint, same ``n_sets``, DPCs and selection).

Each is one MLflow run in the sweep's experiment, nested under the parent run, tagged ``baseline=<name>``, with the
same metric names as a trial (``accuracy/<arch>/dpc<d>``, ``accuracy_std/...``, ``objective``). Their sets and
scores live in ``sets/<name>/baselines/<baseline>/``; a resumed sweep reuses scores already there.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import ray
from mlflow.entities import RunTag

from dilm.coreset import CoresetConfig, build_coresets
from dilm.distill import DistillConfig, Distiller
from dilm.files import write_json
from dilm.synset import read_set
from dilm.tasks import load_task
from tune.config import OBJECTIVE
from tune.pool import PoolClient, PoolSpec
from tune.tracking import PARENT_TAG, SWEEP_TAG, SweepTracker

BASELINE_TAG = "baseline"
BASELINES = ("random", "vanilla")


def objective_of(scores: dict[int, dict[str, dict]]) -> float:
    """As a trial's objective: mean over architectures of the mean over DPCs."""
    archs = sorted({a for per in scores.values() for a in per})
    return statistics.fmean(statistics.fmean(scores[d][a]["accuracy"] for d in scores if a in scores[d])
                            for a in archs)


def baseline_sets(name: str, cfg: DistillConfig, lm_checkpoint: str | None, out: Path) -> dict[int, list]:
    """{dpc: [SynSet]} of one baseline at the trials' DPCs and ``n_sets``."""
    task = load_task(cfg.task)
    if name == "random":
        return build_coresets(task, CoresetConfig(method="random", dpc=tuple(cfg.dpc), n_sets=cfg.n_sets,
                                                  seed=cfg.seed))
    vanilla = dataclasses.replace(cfg, outer_loops=0, lm_checkpoint=lm_checkpoint or "", output_dir=str(out))
    result = Distiller(vanilla, task=task).fit()  # = distill(vanilla), with the task already loaded
    return {d: [read_set(p, task.label_names, task.is_pair) for p in paths] for d, paths in result.sets.items()}


def run_baselines(cfg: DistillConfig, lm_checkpoint: str | None, pool: PoolSpec, tracker: SweepTracker,
                  out_dir: Path, resources) -> dict[str, dict[int, dict[str, dict]]]:
    """Score every baseline on the pool and log it as a tagged MLflow run; {baseline: {dpc: {arch: summary}}}.
    The sets are built by a Ray task with a trial's ``resources`` (the vanilla LM samples where a trial would)."""
    make_sets = ray.remote(num_cpus=resources.cpu, num_gpus=resources.gpu)(baseline_sets)
    out = {}
    for name in BASELINES:
        done = out_dir / name / "scores.json"
        if done.exists():  # resumed sweep: already scored and logged
            out[name] = {int(d): s for d, s in json.loads(done.read_text()).items()}
            continue
        sets = ray.get(make_sets.remote(name, cfg, lm_checkpoint, out_dir / name))
        scores = PoolClient(pool).score(sets)
        log_baseline(tracker, name, scores, lm_checkpoint)
        write_json(done, {str(d): s for d, s in scores.items()})
        out[name] = scores
    return out


def log_baseline(tracker: SweepTracker, name: str, scores: dict, lm_checkpoint: str | None) -> None:
    from tune.trial import score_metrics

    spec, client = tracker.spec, tracker.client
    run = client.create_run(spec.experiment_id, run_name=f"baseline {name}", tags={
        PARENT_TAG: spec.parent_run_id, SWEEP_TAG: spec.sweep, BASELINE_TAG: name})
    if name == "vanilla" and lm_checkpoint:
        client.log_batch(run.info.run_id, tags=[RunTag("dilm.lm_checkpoint", lm_checkpoint)])
    for k, v in {**score_metrics(scores), OBJECTIVE: objective_of(scores)}.items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id, "FINISHED")


def compare(best: dict[int, dict[str, dict]], baselines: dict[str, dict]) -> list[dict]:
    """Rows (arch, dpc): the best trial's accuracy ± std, each baseline's, and the difference in points."""
    rows = []
    for d in sorted(best):
        for a in sorted(best[d]):
            row = {"arch": a, "dpc": d, "best": best[d][a]["accuracy"], "best_std": best[d][a]["accuracy_std"]}
            for name, sc in baselines.items():
                if a in sc.get(d, {}):
                    row[name] = sc[d][a]["accuracy"]
                    row[f"{name}_std"] = sc[d][a]["accuracy_std"]
                    row[f"vs_{name}"] = row["best"] - row[name]
            rows.append(row)
    return rows


def format_compare(rows: list[dict]) -> list[str]:
    """The summary's table: best trial vs each baseline, accuracy ± std over sets × seeds, difference in points."""
    names = [n for n in BASELINES if any(n in r for r in rows)]
    lines = ["  arch               DPC  best trial     " + "".join(f"{n:<15}best-{n:<9}" for n in names)]
    for r in rows:
        cells = "".join(f"{r[n]:5.1f} ± {r[n + '_std']:4.1f}   {r['vs_' + n]:+6.1f}        " if n in r else " " * 30
                        for n in names)
        lines.append(f"  {r['arch']:<18} {r['dpc']:>3}  {r['best']:5.1f} ± {r['best_std']:4.1f}   {cells}".rstrip())
    return lines
