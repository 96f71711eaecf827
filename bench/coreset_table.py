"""The coreset table: random / k-centers / herding at several DPC, and which learner features serve them best.

    python bench/coreset_table.py --json out/coresets.json                        # GPU: 20 sets, herding 10 seeds
    python bench/coreset_table.py --n-sets 3 --herding-seeds 3 --json coresets.json  # CPU scale

Every set is evaluated by the protocol (``minilm-l6``, 200 steps, full test split). k-centers (k-means
nearest-centroid) and herding run on both feature poolings (``mean`` and ``cls`` of the learner's last layer).
Prints test accuracy mean ± std per method and DPC, the difference to random measured in the same run, and the
reference figures of the issue (an H100, quick scripts) beside them.
"""

from __future__ import annotations

import argparse
import time

from record import write  # bench/, beside this script

from dilm.coreset import CoresetConfig, build_coresets
from dilm.device import pick_device
from dilm.evaluate import Evaluator
from dilm.protocol import EvalConfig
from dilm.tasks import load_task

REFERENCE = {  # SST-2, minilm-l6, from the foundation issue (herding and k-means on [CLS] features)
    "random": {5: 55.8, 10: 60.7, 20: 66.0},
    "herding/cls": {5: 69.3, 10: 68.4, 20: 71.1},
    "kcenters/cls": {5: 53.4, 10: 56.0, 20: 68.1},
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="sst2")
    p.add_argument("--dpc", default="5,10,20")
    p.add_argument("--n-sets", type=int, default=20, help="sets per random / k-centers cell (one seed each)")
    p.add_argument("--herding-seeds", type=int, default=10, help="training seeds of the one herding set")
    p.add_argument("--methods", default="random,kcenters/mean,kcenters/cls,herding/mean,herding/cls")
    p.add_argument("--arch", default="minilm-l6")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    dpcs = tuple(int(d) for d in a.dpc.split(","))
    task = load_task(a.task)
    device = pick_device(a.device)
    cells: dict[str, dict[int, dict]] = {}
    for spec in a.methods.split(","):
        method, _, pooling = spec.partition("/")
        t0 = time.perf_counter()
        cfg = CoresetConfig(method=method, dpc=dpcs, n_sets=a.n_sets, pooling=pooling or "mean", device=a.device)
        seeds = a.herding_seeds if method == "herding" else 1
        evaluator = Evaluator(task, EvalConfig(archs=(a.arch,), seeds=seeds, device=a.device, progress=False))
        cells[spec] = {}
        for dpc, sets in build_coresets(task, cfg, device).items():
            s = evaluator.evaluate(sets).summary()[a.arch]
            cells[spec][dpc] = {"mean": s["accuracy"], "std": s["accuracy_std"], "n": s["n"]}
            print(f"{spec} DPC {dpc}: {s['accuracy']:.1f} ± {s['accuracy_std']:.1f} (n={s['n']})", flush=True)
            if a.json:  # after every cell: a run cut short (a 10-minute GPU command) keeps what it measured
                write(a.json, {"task": a.task, "arch": a.arch, "device": str(device), "cells": cells})
        print(f"{spec}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\n| method | {' | '.join(f'DPC {d}' for d in dpcs)} |\n|---|{'---|' * len(dpcs)}")
    for spec, row in cells.items():
        out = []
        for d in dpcs:
            c = row[d]
            diff = f", {c['mean'] - cells['random'][d]['mean']:+.1f} vs random" if "random" in cells else ""
            ref = REFERENCE.get(spec, {}).get(d)
            out.append(f"{c['mean']:.1f} ± {c['std']:.1f} (n={c['n']}{diff}{f'; ref {ref}' if ref else ''})")
        print(f"| {spec} | {' | '.join(out)} |")


if __name__ == "__main__":
    main()
