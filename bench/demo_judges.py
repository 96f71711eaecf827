"""The main job's sets under the protocol's fine-tuned learner — the judge the sweep's objective did not read.

A sweep's summary scores its sets with probes; selection works in MiniLM's feature space, so ``minilm-probe`` alone
could flatter it. This script takes a finished sweep's storage and scores, at one DPC, the best trial's sets, the
vanilla LM's sets, the random real sets and the k-centers and herding coresets (rebuilt by the sweep's own
:func:`tune.baselines.baseline_sets` from the vanilla run's config: same seed, ``n_sets``, halves and learner) with
the protocol's fine-tuned learner (default ``minilm-l6``, 200 steps) over ``--seeds`` seeds per set. Named
baseline: random real sets, scored in the same run. It prints each method's mean ± std over sets (each set's mean
over seeds), n, and the best trial's difference to every other method with Welch's 95 % interval over sets.

    python bench/demo_judges.py /tmp/demo/runs --sweep demo --dpc 10 --seeds 3 --json out.json

On the 2-core CPU one fine-tune (200 steps, then SST-2 dev) takes about 2.7 minutes: 16 sets x 3 seeds is two hours.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import replace
from pathlib import Path

from record import write  # bench/, beside this script
from tqdm.auto import tqdm

from dilm.distill import DistillConfig
from dilm.evaluate import Evaluator
from dilm.protocol import EvalConfig
from dilm.stats import format_interval, summary, welch_interval
from dilm.synset import read_set
from dilm.tasks import load_task
from tune.baselines import baseline_sets
from tune.paths import SweepPaths
from tune.scores import OBJECTIVE, best_row


def best_trial(paths: SweepPaths) -> str:
    """The trial the sweep's report names best (:func:`tune.scores.best_row` over its trials.csv)."""
    with open(paths.reports_dir / "trials.csv", newline="") as f:
        rows = [{**r, OBJECTIVE: float(r[OBJECTIVE])} for r in csv.DictReader(f) if r[OBJECTIVE]]
    return best_row(rows)["ray_trial_id"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("storage", type=Path, help="the sweep's --storage")
    p.add_argument("--sweep", default="demo")
    p.add_argument("--dpc", type=int, default=10)
    p.add_argument("--arch", default="minilm-l6", help="the judge (default: the protocol's fine-tuned MiniLM-L6)")
    p.add_argument("--seeds", type=int, default=3, help="learner seeds per set")
    p.add_argument("--without-vanilla", action="store_true", help="skip the vanilla LM's sets (a fine-tune takes "
                                                                   "minutes on a CPU)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    paths = SweepPaths(a.storage, a.sweep, tune_storage="")  # the sweep's layout, as tune.report reads it
    vanilla = paths.baseline_dir("vanilla")
    prov = json.loads((vanilla / "provenance.json").read_text())["config"]
    cfg = replace(DistillConfig(**prov), dpc=(a.dpc,), device="cpu")  # the sweep's config, at the one DPC
    task = load_task(cfg.task)
    names, pair = task.label_names, task.is_pair
    trial = best_trial(paths)
    methods = {
        f"best trial ({trial})": [read_set(f, names, pair) for f in sorted((paths.trial_sets(trial) / f"dpc{a.dpc}")
                                                                          .glob("*.jsonl"))],
    }
    if not a.without_vanilla:
        methods["vanilla LM"] = [read_set(f, names, pair) for f in sorted((vanilla / "sets" / f"dpc{a.dpc}")
                                                                          .glob("*.jsonl"))]
    for method in ("random", "kcenters", "herding"):  # the sweep's own baselines, rebuilt as it built them
        methods[f"{method} real"] = baseline_sets(method, cfg, None, "")[a.dpc]
    judge = Evaluator(task, EvalConfig(archs=(a.arch,), seeds=a.seeds, device="cpu", progress=False))
    per_set: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    with tqdm(total=sum(map(len, methods.values())), desc=f"{a.arch} x {a.seeds} seeds") as bar:
        for method, sets in methods.items():
            for s in sets:
                per_set.setdefault(method, []).append(judge.evaluate([s]).summary()[a.arch]["accuracy"])
                bar.update()
    out = {"args": {k: str(v) for k, v in vars(a).items()}, "best_trial": trial, "seconds": time.perf_counter() - t0,
           "per_set": per_set, "summary": {m: summary(v) for m, v in per_set.items()}, "best_minus": {}}
    best = next(iter(per_set))
    print(f"{cfg.task.name} DPC {a.dpc}, judge {a.arch} ({a.seeds} seeds per set), mean ± std over sets:")
    for m, s in out["summary"].items():
        print(f"  {m:28s} {s['mean']:5.1f} ± {s['std']:4.1f} (n = {s['n']} sets)")
    for m in list(per_set)[1:]:
        out["best_minus"][m] = ci = welch_interval(out["summary"][best], out["summary"][m])
        print(f"  best trial - {m:17s} {format_interval(ci)}")
    if a.json:
        write(a.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
