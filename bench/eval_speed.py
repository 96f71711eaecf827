"""The protocol's fine-tuned judge on the CPU: today's ``dilm evaluate`` (the code of ``--baseline-rev``, checked out
beside this one) against this checkout, on the same (set, seed) pairs, in one run.

    python bench/eval_speed.py --baseline-rev cbe916f --sets 10 --seeds 2 --json out.json    # ~40 min on 2 cores

Both sides run the same protocol (learner, 200 steps, schedule, batch, the test split) through ``Evaluator``; this
checkout's levers are its ``precision`` values (``--precisions``: ``fp32`` = length-sorted micro-batches and test
chunks only; ``auto`` = those plus bf16 autocast where the CPU has native bf16) with its other defaults (only the
embedding rows a set uses trained; ``workers``: one learner process per core for 200-step fits). Each side runs in
its own process (the other revision's package first on ``PYTHONPATH``), a few sets at a time, the sides interleaved
chunk by chunk so that the load of other processes falls on all of them alike; each process times its evaluations
only (model loading, and a checkout's worker processes starting, excluded). Printed: seconds per (set, seed) and the
ratio to the baseline, and the paired accuracy difference (this checkout − baseline, same set and seed) with its
95 % interval — the speed-up must leave accuracy unchanged (target: the interval inside ±1 point).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, time, dataclasses
from dilm.evaluate import Evaluator
from dilm.protocol import EvalConfig
from dilm.synset import read_set
from dilm.tasks import load_task
args = json.loads(sys.argv[1])
task = load_task(args["task"])
fields = {f.name for f in dataclasses.fields(EvalConfig)}
extra = {"precision": args["precision"]} if args["precision"] and "precision" in fields else {}
ev = Evaluator(task, EvalConfig(archs=(args["arch"],), seeds=args["seeds"], progress=False, **extra))
sets = [read_set(p, task.label_names, task.is_pair) for p in args["sets"]]
ev.ctx.model(args["arch"], "classifier")  # loaded before the clock starts
try:  # and the worker processes of a checkout that has them, their models loaded
    from dilm.archs import finetune
    if (w := finetune.cpu_workers(ev.cfg, ev.device, args["seeds"])) > 1:
        list(finetune.worker_pool(ev.ctx, args["arch"], w).map(abs, range(w)))
except (ImportError, AttributeError):
    pass
out = []
for s in sets:
    t = time.perf_counter()
    accs = ev.evaluate([s]).by_arch[args["arch"]].accuracies
    out.append({"s": time.perf_counter() - t, "accuracies": accs})
print("RESULT " + json.dumps(out))
"""


def side(code: Path, sets: list[str], a, precision: str | None) -> list[dict]:
    """Evaluate ``sets`` with the package in ``code`` in a fresh process; per set: seconds and accuracies."""
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
    args = {"task": a.task, "arch": a.arch, "seeds": a.seeds, "precision": precision, "sets": sets}
    run = subprocess.run([sys.executable, "-c", WORKER, json.dumps(args)], env=env, cwd=code, capture_output=True,
                         text=True, check=False)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode or not lines:
        raise SystemExit(f"{code} ({precision}) failed:\n{run.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline-rev", required=True, help="the commit whose dilm evaluate is the baseline")
    p.add_argument("--task", default="sst2")
    p.add_argument("--arch", default="minilm-l6")
    p.add_argument("--dpc", type=int, default=10)
    p.add_argument("--sets", type=int, default=10, help="random real sets (each with --seeds seeds: the pairs)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--chunk", type=int, default=1, help="sets per process, the sides interleaved chunk by chunk")
    p.add_argument("--precisions", default="fp32,auto", help="this checkout's precisions to time")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from record import write  # bench/, beside this script

    from dilm.coreset import CoresetConfig, build_coresets
    from dilm.device import cpu_has_bf16
    from dilm.stats import paired_interval
    from dilm.synset import write_set
    from dilm.tasks import load_task

    work = Path(tempfile.mkdtemp(prefix="eval-speed-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(work / "baseline"), a.baseline_rev],
                   check=True, capture_output=True)
    try:
        task = load_task(a.task)
        sets = [str(write_set(work / f"set{k:02d}.jsonl", s)) for k, s in enumerate(
            build_coresets(task, CoresetConfig(method="random", dpc=(a.dpc,), n_sets=a.sets))[a.dpc])]
        sides = {"baseline": (work / "baseline", None), **{f"this:{q}": (ROOT, q) for q in a.precisions.split(",")}}
        results: dict[str, list[dict]] = {name: [] for name in sides}
        t0 = time.time()
        for i in range(0, len(sets), a.chunk):
            for name, (code, precision) in sides.items():
                results[name] += side(code, sets[i: i + a.chunk], a, precision)
            print(f"  {min(i + a.chunk, len(sets))}/{len(sets)} sets, {time.time() - t0:.0f} s", flush=True)
            out = speed_summary(results, a, cpu_has_bf16(), paired_interval)  # after every chunk: a partial run counts
            if a.json:
                write(a.json, out)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "baseline")],
                       check=False, capture_output=True)
    print(f"{a.task} DPC {a.dpc}, {a.arch}, {out['pairs']} (set, seed) pairs; CPU native bf16: {cpu_has_bf16()}")
    print(f"  baseline ({a.baseline_rev})  {out['baseline_s_per_pair']:6.2f} s/pair  accuracy "
          f"{out['baseline_accuracy']:.2f}")
    for name, r in out["sides"].items():
        lo, hi = r["interval"]
        print(f"  {name:<14} {r['s_per_pair']:6.2f} s/pair  {r['ratio']:4.2f}x  accuracy {r['accuracy']:.2f}  "
              f"paired difference {r['paired_difference']:+.2f} [{lo:+.2f}, {hi:+.2f}]")


def speed_summary(results: dict[str, list[dict]], a, native_bf16: bool, paired_interval) -> dict:
    """Seconds per (set, seed) pair and accuracy of each side; this checkout's against the baseline: the ratio and
    the paired accuracy difference (same set and seed) with its 95 % interval."""
    base = results["baseline"]
    pairs = sum(len(r["accuracies"]) for r in base)
    base_s = sum(r["s"] for r in base) / pairs
    base_acc = [x for r in base for x in r["accuracies"]]
    out = {"baseline_rev": a.baseline_rev, "task": a.task, "arch": a.arch, "dpc": a.dpc, "pairs": pairs,
           "cpu_native_bf16": native_bf16, "baseline_s_per_pair": base_s,
           "baseline_accuracy": 100 * sum(base_acc) / pairs, "sides": {}, "results": results}
    for name, rs in results.items():
        if name == "baseline":
            continue
        s = sum(r["s"] for r in rs) / pairs
        acc = [x for r in rs for x in r["accuracies"]]
        ci = paired_interval([100 * (x - y) for x, y in zip(acc, base_acc, strict=True)])
        out["sides"][name] = {"s_per_pair": s, "ratio": base_s / s, "accuracy": 100 * sum(acc) / pairs,
                              "paired_difference": ci["mean"], "interval": [ci["lo"], ci["hi"]]}
    return out

if __name__ == "__main__":
    main()
