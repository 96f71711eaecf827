"""``<model>``: a model name (``minilm-l6``, ``smollm2-135m``, ``tiny-bert``, any HF id/path) fine-tuned with a fresh
classification head by the protocol (:mod:`dilm.protocol`), one learner per (set, seed).

The learners of one call are trained as an *ensemble* (:mod:`dilm.ensemble`): parameters stacked with
``torch.func.stack_module_state`` and the forward ``vmap``-ed over members, each member with its own set, seed and
data order; one process then keeps a GPU busy with many small evaluations. On the CPU the learners are trained one
at a time, which is faster there (``python bench/cpu_ensemble.py``).
"""

from __future__ import annotations

import re

import numpy as np
import torch

from dilm.archs.base import ArchKind, EvalContext, Predictions
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


def score(ctx: EvalContext, model: str, sets: list[SynSet]) -> Predictions:
    base = ctx.model(model, "classifier")  # members copy its weights; it stays untouched
    size = ctx.cfg.ensemble if ctx.device.type != "cpu" else 1  # CPU: one at a time is faster
    jobs = ctx.jobs(sets)
    for i in range(0, len(jobs), size):
        for preds in finetune_ensemble(model, jobs[i: i + size], ctx.test, ctx.cfg, ctx.device, base):
            yield preds, 1


KIND = ArchKind("finetune", "<model>", re.compile(r"(?P<model>.+)"), score)
