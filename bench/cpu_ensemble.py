"""Learner steps per second on the CPU: the evaluation protocol's training loop over N learners, three ways, measured
in the same run. Named baseline: the ``vmap`` ensemble (what a GPU runs); the others print their ratio to it.

    python bench/cpu_ensemble.py                       # MiniLM-L6, SST-2 DPC 10, 5 learners, 30 steps each

* ``vmap``      — the stacked ensemble, forward ``vmap``-ed over members (``Ensemble(vectorized=True)``);
* ``in turn``   — the same stacked parameters, members called one after another (the CPU path of ``Ensemble``);
* ``one by one`` — N ensembles of one learner, one after another (what ``Evaluator`` does on the CPU).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from dilm.ensemble import Ensemble, train_ensemble
from dilm.models import load_model, load_tokenizer
from dilm.protocol import EvalConfig
from dilm.tasks import load_task
from dilm.text import encode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="minilm-l6")
    p.add_argument("--task", default="sst2")
    p.add_argument("--dpc", type=int, default=10)
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cpu = torch.device("cpu")
    task, tok = load_task(a.task), load_tokenizer(a.arch)
    base = load_model(a.arch, "classifier", task.num_classes, cpu).train()
    sets = [[e for c in range(task.num_classes) for e in random.Random(i).sample(
        [x for x in task.train if x.label == c], a.dpc)] for i in range(a.members)]
    n = len(sets[0])
    enc = encode(tok, [e.text for s in sets for e in s], 128, cpu, None)
    inputs = {k: v.view(a.members, n, -1) for k, v in enc.items()}
    targets = torch.stack([torch.eye(task.num_classes)[[e.label for e in s]] for s in sets])
    cfg = EvalConfig(archs=(a.arch,), steps=a.steps, progress=False)

    def timed(members: slice, vectorized: bool) -> float:
        seeds = list(range(members.start, members.stop))
        ens = Ensemble(base, seeds, cpu, vectorized=vectorized)
        t = time.perf_counter()
        train_ensemble(ens, {k: v[members] for k, v in inputs.items()}, targets[members], [n] * len(seeds), seeds,
                       cfg, cpu)
        return time.perf_counter() - t

    timed(slice(0, 1), False)  # warm-up: kernels, allocator
    seconds = {"vmap": timed(slice(0, a.members), True), "in turn": timed(slice(0, a.members), False),
               "one by one": sum(timed(slice(i, i + 1), False) for i in range(a.members))}
    rate = {k: a.members * a.steps / v for k, v in seconds.items()}
    print(f"{a.arch}, {a.task} DPC {a.dpc}, {a.members} learners x {a.steps} steps, {a.threads} threads")
    for k, r in rate.items():
        print(f"  {k:>10}: {r:5.2f} learner steps/s ({1 / r:.2f} s per learner step), "
              f"{r / rate['vmap']:.2f}x vs vmap")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
