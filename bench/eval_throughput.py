"""Evaluations per minute: one ensemble of N learners trained at once (vmap) vs the same evaluations one after
another, measured in the same run.

    python bench/eval_throughput.py --arch minilm-l6 --n 32 --sequential 4      # GPU (target: >= 20x)
    python bench/eval_throughput.py --arch tiny-bert --n 8 --sequential 2 --test-limit 200   # CPU check
"""

from __future__ import annotations

import argparse
import time

import torch
from record import write  # bench/, beside this script

from dilm.coreset import CoresetConfig, build_coresets
from dilm.device import pick_device
from dilm.evaluate import Evaluator
from dilm.protocol import EvalConfig
from dilm.tasks import load_task


def run(evaluator: Evaluator, sets, seeds) -> float:
    if evaluator.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    evaluator.evaluate(sets)
    if evaluator.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="sst2")
    p.add_argument("--arch", default="minilm-l6")
    p.add_argument("--dpc", type=int, default=10)
    p.add_argument("--n", type=int, default=32, help="evaluations in the concurrent run")
    p.add_argument("--sequential", type=int, default=4, help="evaluations timed one after another")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    device = pick_device("auto")
    task = load_task(a.task)
    sets = build_coresets(task, CoresetConfig(method="random", dpc=(a.dpc,), n_sets=a.n), device)[a.dpc]
    common = dict(archs=(a.arch,), seeds=1, steps=a.steps, test_limit=a.test_limit, progress=False)
    seq = Evaluator(task, EvalConfig(ensemble=1, **common))
    run(seq, sets[:1], 1)  # warm-up: model load, kernels
    t_seq = run(seq, sets[: a.sequential], 1) / a.sequential
    conc = Evaluator(task, EvalConfig(ensemble=a.n, **common))
    run(conc, sets[:2], 1)
    t_conc = run(conc, sets, 1) / a.n
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "arch": a.arch,
           "sequential_s_per_eval": t_seq, "concurrent_s_per_eval": t_conc,
           "evals_per_min": 60 / t_conc, "sequential_evals_per_min": 60 / t_seq, "ratio": t_seq / t_conc}
    if device.type == "cuda":
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"{a.arch} on {out['device']}: sequential {t_seq:.2f} s/eval ({60 / t_seq:.1f}/min), "
          f"ensemble of {a.n}: {t_conc:.2f} s/eval ({60 / t_conc:.1f}/min) → ratio {t_seq / t_conc:.1f}x")
    if a.json:
        write(a.json, out)


if __name__ == "__main__":
    main()
