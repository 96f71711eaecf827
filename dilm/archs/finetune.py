"""``<model>``: a model name (``minilm-l6``, ``smollm2-135m``, ``tiny-bert``, any HF id/path) fine-tuned with a fresh
classification head by the protocol (:mod:`dilm.protocol`), one learner per (set, seed).

The learners of one call are trained as an *ensemble* (:mod:`dilm.ensemble`): parameters stacked with
``torch.func.stack_module_state`` and the forward ``vmap``-ed over members, each member with its own set, seed and
data order; one process then keeps a GPU busy with many small evaluations. On the CPU the learners are trained one
at a time, which is faster there (``python bench/eval_throughput.py --learner-steps``), and side by side in worker
processes of one thread each (:func:`cpu_workers`): a learner's small matrices keep one core busier than two. A CPU
on the GPU's paths (:func:`dilm.device.gpu_paths`) trains as a GPU does: ``ensemble`` members at once, no workers.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import re
import threading
import time
import weakref

import numpy as np
import torch

from dilm.archs.base import ArchKind, EvalContext, Predictions
from dilm.device import cpu_threads, gpu_paths
from dilm.ensemble import Ensemble, predict_ensemble, train_ensemble
from dilm.models import load_model, load_tokenizer
from dilm.protocol import EvalConfig
from dilm.synset import SynSet
from dilm.tasks import Example
from dilm.text import encode, pair_args


def finetune_ensemble(model_name: str, jobs: list[tuple[SynSet, int]], test: list[Example], cfg: EvalConfig,
                      device, base: torch.nn.Module | None = None) -> list[np.ndarray]:
    """Train one learner per (set, seed) job, all at once; return each member's test predictions."""
    tok = load_tokenizer(model_name)
    num_classes = jobs[0][0].num_classes
    base = base or load_model(model_name, "classifier", num_classes, device)
    with torch.random.fork_rng(devices=[] if torch.device(device).type == "cpu" else [device]):
        torch.manual_seed(jobs[0][1])  # dropout draws: the same fit in any process, beside any other
        return _finetune(tok, base, jobs, test, cfg, device)


def _finetune(tok, base, jobs: list[tuple[SynSet, int]], test: list[Example], cfg: EvalConfig, device
              ) -> list[np.ndarray]:
    num_classes = jobs[0][0].num_classes
    base.train()
    n = len(jobs)
    ens = Ensemble(base, [seed for _, seed in jobs], device)

    # Training data, (N, max_n, T) per model input and (N, max_n, C) targets; each set tokenized once, a pair
    # through the tokenizer's pair API (separator, segment ids).
    sizes = [len(s) for s, _ in jobs]
    texts, pairs = pair_args([e for s, _ in jobs for e in s.examples])
    enc = encode(tok, texts, cfg.max_length, device, pairs)
    t = enc["input_ids"].shape[1]
    inputs = {k: torch.full((n, max(sizes), t), tok.pad_token_id if k == "input_ids" else 0, dtype=torch.long,
                            device=device) for k in enc}
    targets = torch.zeros((n, max(sizes), num_classes), device=device)
    start = 0
    for i, (s, _) in enumerate(jobs):
        for k, v in enc.items():
            inputs[k][i, : len(s)] = v[start: start + len(s)]
        targets[i, : len(s)] = torch.tensor([e.target(num_classes) for e in s.examples], device=device)
        start += len(s)

    train_ensemble(ens, inputs, targets, sizes, [seed for _, seed in jobs], cfg, device)
    return predict_ensemble(ens, tok, test, cfg, device)


MIN_POOL_STEPS = 100  # a worker's start (~5 s: torch, transformers, the model) pays off only for fits this long


def cpu_workers(cfg: EvalConfig, device: torch.device, jobs: int) -> int:
    """Worker processes for ``jobs`` fits: ``cfg.workers``, or (0) one per CPU this process may use, on the CPU, for
    fits of at least :data:`MIN_POOL_STEPS` steps; never more than the jobs. 1: train here."""
    if gpu_paths(device):
        return 1
    n = cfg.workers or (cpu_threads() if cfg.steps >= MIN_POOL_STEPS else 1)
    return max(1, min(n, jobs))


_WORKER: dict = {}  # a worker process's model, test split and config


def exit_with_parent(poll_s: float = 1.0) -> None:
    """In a pool's worker process: end it when the process that started it is gone (a pool's workers outlive a
    parent killed by a signal — SIGKILL, or SIGTERM with no handler — and would go on burning the CPU). A daemon thread
    polls the parent's pid every ``poll_s`` seconds."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _start_worker(model_name: str, num_classes: int, test: list[Example], cfg: EvalConfig, threads: int) -> None:
    exit_with_parent()
    torch.set_num_threads(threads)
    base = load_model(model_name, "classifier", num_classes, torch.device("cpu"))
    _WORKER.update(model=model_name, base=base, test=test, cfg=cfg)


def _worker_fit(job: tuple[SynSet, int]) -> np.ndarray:
    w = _WORKER
    return finetune_ensemble(w["model"], [job], w["test"], w["cfg"], torch.device("cpu"), w["base"])[0]


def worker_pool(ctx: EvalContext, model: str, workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """``workers`` processes (spawned: no forked OpenMP state), the CPU threads split among them, each with its own
    copy of ``model``; kept with the context, as its models are."""
    def start() -> concurrent.futures.ProcessPoolExecutor:
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
            initargs=(model, ctx.task.num_classes, ctx.test, ctx.cfg, max(1, cpu_threads() // workers)))
        weakref.finalize(ctx, pool.shutdown)  # with the context, or at exit while the interpreter is whole
        return pool

    return ctx.kept(("pool", model, workers), start)


def score(ctx: EvalContext, model: str, sets: list[SynSet]) -> Predictions:
    jobs = ctx.jobs(sets)
    if (workers := cpu_workers(ctx.cfg, ctx.device, len(jobs))) > 1:
        for preds in worker_pool(ctx, model, workers).map(_worker_fit, jobs):
            yield preds, 1
        return
    base = ctx.model(model, "classifier")  # members copy its weights; it stays untouched
    size = ctx.cfg.ensemble if gpu_paths(ctx.device) else 1  # CPU: one at a time is faster
    for i in range(0, len(jobs), size):
        for preds in finetune_ensemble(model, jobs[i: i + size], ctx.test, ctx.cfg, ctx.device, base):
            yield preds, 1


KIND = ArchKind("finetune", "<model>", re.compile(r"(?P<model>.+)"), score)
