"""How fast the protocol's learners train: evaluations per minute of one ensemble of N learners trained at once
(vmap) against the same evaluations one after another, or (``--learner-steps``) learner steps per second of the
protocol's training loop three ways. Each measured in one run beside its named baseline.

    python bench/eval_throughput.py --arch minilm-l6 --n 32 --sequential 4      # GPU (target: >= 20x)
    python bench/eval_throughput.py --arch tiny-bert --n 8 --sequential 2 --test-limit 200   # CPU check
    python bench/eval_throughput.py --learner-steps      # CPU: MiniLM-L6, SST-2 DPC 10, 5 learners x 30 steps

``--learner-steps`` (formerly ``bench/cpu_ensemble.py``; its flags ``--members``, ``--threads``, and ``--steps``
default 30 there) times, on the CPU, with the ``vmap`` ensemble as the baseline:

* ``vmap``      — the stacked ensemble, forward ``vmap``-ed over members (``Ensemble(vectorized=True)``);
* ``in turn``   — the same stacked parameters, members called one after another (the CPU path of ``Ensemble``);
* ``one by one`` — N ensembles of one learner, one after another.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from record import write  # bench/, beside this script

from dilm.coreset import CoresetConfig, build_coresets
from dilm.device import pick_device
from dilm.ensemble import Ensemble, train_ensemble
from dilm.evaluate import Evaluator
from dilm.models import load_model, load_tokenizer
from dilm.protocol import EvalConfig
from dilm.tasks import load_task
from dilm.text import encode


def run(evaluator: Evaluator, sets) -> float:
    if evaluator.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    evaluator.evaluate(sets)
    if evaluator.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def evaluations(a) -> dict:
    """Seconds per evaluation, sequential (ensemble 1) and concurrent (one ensemble of ``--n``), and their ratio."""
    device = pick_device("auto")
    task = load_task(a.task)
    sets = build_coresets(task, CoresetConfig(method="random", dpc=(a.dpc,), n_sets=a.n), device)[a.dpc]
    common = dict(archs=(a.arch,), seeds=1, steps=a.steps or 200, test_limit=a.test_limit, progress=False)
    seq = Evaluator(task, EvalConfig(ensemble=1, **common))
    run(seq, sets[:1])  # warm-up: model load, kernels
    t_seq = run(seq, sets[: a.sequential]) / a.sequential
    conc = Evaluator(task, EvalConfig(ensemble=a.n, **common))
    run(conc, sets[:2])
    t_conc = run(conc, sets) / a.n
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "arch": a.arch,
           "sequential_s_per_eval": t_seq, "concurrent_s_per_eval": t_conc,
           "evals_per_min": 60 / t_conc, "sequential_evals_per_min": 60 / t_seq, "ratio": t_seq / t_conc}
    if device.type == "cuda":
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"{a.arch} on {out['device']}: sequential {t_seq:.2f} s/eval ({60 / t_seq:.1f}/min), "
          f"ensemble of {a.n}: {t_conc:.2f} s/eval ({60 / t_conc:.1f}/min) → ratio {t_seq / t_conc:.1f}x")
    return out


def learner_steps(a) -> dict:
    """Learner steps per second on the CPU: ``--members`` learners × ``--steps`` steps, the three ways."""
    torch.set_num_threads(a.threads)
    cpu, steps = torch.device("cpu"), a.steps or 30
    task, tok = load_task(a.task), load_tokenizer(a.arch)
    base = load_model(a.arch, "classifier", task.num_classes, cpu).train()
    sets = [[e for c in range(task.num_classes) for e in random.Random(i).sample(
        [x for x in task.train if x.label == c], a.dpc)] for i in range(a.members)]
    n = len(sets[0])
    enc = encode(tok, [e.text for s in sets for e in s], 128, cpu, None)
    inputs = {k: v.view(a.members, n, -1) for k, v in enc.items()}
    targets = torch.stack([torch.eye(task.num_classes)[[e.label for e in s]] for s in sets])
    cfg = EvalConfig(archs=(a.arch,), steps=steps, progress=False)

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
    rate = {k: a.members * steps / v for k, v in seconds.items()}
    print(f"{a.arch}, {a.task} DPC {a.dpc}, {a.members} learners x {steps} steps, {a.threads} threads")
    for k, r in rate.items():
        print(f"  {k:>10}: {r:5.2f} learner steps/s ({1 / r:.2f} s per learner step), "
              f"{r / rate['vmap']:.2f}x vs vmap")
    return {"learner_steps_per_s": rate, "vs_vmap": {k: r / rate["vmap"] for k, r in rate.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sst2")
    p.add_argument("--arch", default="minilm-l6")
    p.add_argument("--dpc", type=int, default=10)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the protocol's 200; 30 with "
                                                            "--learner-steps)")
    p.add_argument("--n", type=int, default=32, help="evaluations in the concurrent run")
    p.add_argument("--sequential", type=int, default=4, help="evaluations timed one after another")
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--learner-steps", action="store_true", help="learner steps/s three ways on the CPU instead")
    p.add_argument("--members", type=int, default=5, help="--learner-steps: learners")
    p.add_argument("--threads", type=int, default=2, help="--learner-steps: torch threads")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    out = learner_steps(a) if a.learner_steps else evaluations(a)
    if a.json:
        write(a.json, out)


if __name__ == "__main__":
    main()
