"""The unroll shared by soft-label learning (:mod:`dilm.softlabel`) and TDD (:mod:`dilm.tdd`).

Vocabulary:

* **proxy learner** — the learner that is unrolled. ``head`` (the default, cheap on CPU): a linear classifier on
  frozen learner features (:func:`dilm.features.embed`, standardised on real data so that ``|x| ≈ 1``).
  ``full``: the whole classifier (pre-trained body + fresh head, word-embedding table frozen) through
  ``torch.func.functional_call``.
* **unroll** — ``UnrollConfig.steps`` differentiable learner updates (explicit SGD or Adam, constant step or the
  protocol's warm-up/decay) on the synthetic set, from a fresh random head, written with ``torch.func.grad`` so
  that they can be differentiated again.
* **outer loss** — cross-entropy of the unrolled learner on a mini-batch of *real training* examples (never the
  test split), averaged over ``learners`` fresh initialisations; its gradient with respect to what is learned (labels,
  TDD's embeddings, the unroll's log learning rate) drives an Adam step: one **outer step** (:func:`outer_loop`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from dilm import DilmError
from dilm.features import EMBED_POOLINGS, embed
from dilm.models import check_model, head_param_names, is_causal, load_model, load_tokenizer
from dilm.options import option
from dilm.protocol import PROTOCOL, linear_warmup_decay
from dilm.seeds import derive_seed
from dilm.tasks import Example, TaskData
from dilm.text import additive_mask, encode, join_pair

MODES = ("head", "full")
INNER_OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "protocol")  # protocol: the evaluation's linear warm-up, then decay (dilm.protocol)
# Unroll step size when none is given: head mode sees |x| ≈ 1 features; full mode moves a pre-trained body.
DEFAULT_INNER_LR = {("head", "sgd"): 1.0, ("head", "adam"): 0.02, ("full", "sgd"): 0.01, ("full", "adam"): 1e-3}
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
LOG_LR_RANGE = 3.0  # a learned log step size stays within ±3 of its start (e^3 ≈ 20×): the unroll cannot blow up

Inputs = torch.Tensor | dict[str, torch.Tensor]  # features (B, H) in head mode, tokenizer-style dicts in full mode


@dataclass(frozen=True)
class UnrollConfig:
    """The proxy learner and how it is unrolled; shared by soft-label learning and TDD."""

    learner: str = option("minilm-l6", "model whose features / body the proxy uses")
    mode: str = option("head", "head: linear head on frozen features; full: whole model", choices=MODES)
    pooling: str = option("pooler", "head-mode features: pooler (the classifier's own [CLS] pooler, as evaluated), "
                                    "mean or cls", choices=EMBED_POOLINGS)
    steps: int = option(20, "differentiable learner steps per outer step")
    optimizer: str = option("sgd", "unrolled update: sgd or adam", choices=INNER_OPTIMIZERS)
    schedule: str = option("constant", "unroll step size: constant or protocol (warm-up over the first "
                           f"{PROTOCOL.warmup_ratio:.0%} of the steps, then decay)", choices=SCHEDULES)
    lr: float | None = option(None, "unroll step size (none: by mode/optimizer: " + ", ".join(
        f"{m}/{o} {lr:g}" for (m, o), lr in DEFAULT_INNER_LR.items()) + ")")
    learn_lr: bool = option(True, "learn the unroll's (log) step size too")
    learners: int = option(4, "fresh learner initialisations per outer step")
    batch_size: int = option(64, "synthetic examples per unroll step (set when smaller)")
    real_per_class: int = option(500, "real training examples per class in the pool")
    real_batch: int = option(256, "real examples per outer loss")
    max_length: int = option(PROTOCOL.max_length, "token limit of real and synthetic texts (the evaluation "
                                                  "protocol's)")

    def __post_init__(self):
        if self.mode not in MODES:
            raise DilmError(f"unknown unroll mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.optimizer not in INNER_OPTIMIZERS:
            raise DilmError(f"unknown unroll optimizer {self.optimizer!r}; known: {', '.join(INNER_OPTIMIZERS)}")
        if self.pooling not in EMBED_POOLINGS:
            raise DilmError(f"unknown pooling {self.pooling!r}; known: {', '.join(EMBED_POOLINGS)}")
        if self.schedule not in SCHEDULES:
            raise DilmError(f"unknown unroll schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if min(self.steps, self.learners, self.batch_size, self.real_per_class, self.real_batch, self.max_length) < 1:
            raise DilmError("unroll steps, learners, batch_size, real_per_class, real_batch, max_length must be >= 1")
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_INNER_LR[(self.mode, self.optimizer)])
        if not self.lr > 0:
            raise DilmError(f"unroll lr must be > 0, got {self.lr}")
        check_model(self.learner, "learner")  # a name that does not resolve: now, not after the data is read


# --------------------------------------------------------------------------- the unrolled learner (math)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -Σ_c t_c log p_c; logits and targets (B, C)."""
    return -(targets * torch.log_softmax(logits, -1)).sum(-1).mean()


def take(inputs: Inputs, idx: torch.Tensor) -> Inputs:
    return {k: v[idx] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[idx]


def inner_update(params: dict, grads: dict, state: dict | None, lr: torch.Tensor, optimizer: str,
                 t: int) -> tuple[dict, dict | None]:
    """One differentiable learner update (t counts from 1). Adam uses sqrt(v̂ + eps²) rather than sqrt(v̂) + eps:
    the same step where gradients are large, and a finite derivative where a gradient is exactly zero."""
    if optimizer == "sgd":
        return {k: p - lr * grads[k] for k, p in params.items()}, state
    b1, b2 = ADAM_BETAS
    m = {k: b1 * state["m"][k] + (1 - b1) * g for k, g in grads.items()}
    v = {k: b2 * state["v"][k] + (1 - b2) * g * g for k, g in grads.items()}
    new = {k: p - lr * (m[k] / (1 - b1**t)) / torch.sqrt(v[k] / (1 - b2**t) + ADAM_EPS**2) for k, p in params.items()}
    return new, {"m": m, "v": v}


def functional_inner_grad(forward: Callable) -> Callable:
    """∂ soft-CE / ∂ params of one learner by ``torch.func.grad`` (differentiable again: the unroll is)."""

    def inner_loss(p, x, y):
        return soft_cross_entropy(forward(p, x), y)

    return grad(inner_loss)


def unroll(inner_grad: Callable, params: dict, syn: Inputs, targets: torch.Tensor, lr: torch.Tensor | float,
           steps: int, optimizer: str = "sgd", batches: torch.Tensor | None = None,
           schedule: str = "constant") -> dict:
    """``steps`` differentiable updates from ``params`` on (syn, targets (n, C)); ``batches`` (steps, b) indexes
    the synthetic set (None: all of it at every step); ``protocol`` scales step t by the evaluation's schedule."""
    state = None if optimizer == "sgd" else {s: {k: torch.zeros_like(v) for k, v in params.items()} for s in "mv"}
    for t in range(steps):
        x, y = (syn, targets) if batches is None else (take(syn, batches[t]), targets[batches[t]])
        lr_t = lr * linear_warmup_decay(t, steps, PROTOCOL.warmup_ratio) if schedule == "protocol" else lr
        params, state = inner_update(params, inner_grad(params, x, y), state, lr_t, optimizer, t + 1)
    return params


def unrolled_loss(forward: Callable, inner_grad: Callable, params: dict, syn: Inputs, targets: torch.Tensor,
                  lr: torch.Tensor, real: Inputs, real_labels: torch.Tensor, steps: int, optimizer: str = "sgd",
                  batches: torch.Tensor | None = None, schedule: str = "constant") -> torch.Tensor:
    """:func:`unroll`, then the cross-entropy on the real batch (averaged over learners too when ``forward``
    gives (K, B, C) logits)."""
    params = unroll(inner_grad, params, syn, targets, lr, steps, optimizer, batches, schedule)
    logits = forward(params, real)  # (B, C) or (K, B, C)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), real_labels.expand(logits.shape[:-1]).reshape(-1))


def mean_unrolled_loss(proxy, params0, syn: Inputs, targets: torch.Tensor, lr: torch.Tensor, real: Inputs,
                       real_labels: torch.Tensor, ucfg: UnrollConfig, batches: torch.Tensor | None) -> torch.Tensor:
    """The outer loss averaged over fresh learners: stacked heads in one call, full models one by one."""
    if proxy.batched:
        return unrolled_loss(proxy.forward, proxy.inner_grad, params0, syn, targets, lr, real, real_labels,
                             ucfg.steps, ucfg.optimizer, batches, ucfg.schedule)
    inner_grad = functional_inner_grad(proxy.forward)
    return torch.stack([unrolled_loss(proxy.forward, inner_grad, p, syn, targets, lr, real, real_labels, ucfg.steps,
                                      ucfg.optimizer, batches, ucfg.schedule) for p in params0]).mean()


# --------------------------------------------------------------------------- proxy learners


class HeadProxy:
    """K linear heads on frozen features, trained side by side: inputs (B, H) standardised on real data (per
    dimension, then / sqrt(H), so |x| ≈ 1), params {"weight": (K, C, H), "bias": (K, C)}, logits (K, B, C).

    The unroll's inner gradient is the closed form of the soft cross-entropy's (a handful of ops per step instead
    of a nested ``torch.func.grad``: on CPU the unroll is dispatch-bound); a test checks it against ``torch.func``.
    """

    batched = True

    def __init__(self, real_features: torch.Tensor, real_labels: torch.Tensor, num_classes: int):
        h = real_features.shape[1]
        self.mean = real_features.mean(0)
        self.scale = real_features.std(0).clamp_min(1e-6) * math.sqrt(h)
        self.real = self.standardise(real_features)  # (N, H)
        self.real_labels = real_labels
        self.num_classes = num_classes
        self.dtype = real_features.dtype

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.scale

    @staticmethod
    def forward(params: dict, x: torch.Tensor) -> torch.Tensor:
        return x @ params["weight"].transpose(-1, -2) + params["bias"][..., None, :]  # (B, H) → (K, B, C)

    @staticmethod
    def inner_grad(params: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
        """∂/∂W of each head's batch-mean soft CE: (Σ_c y_c · softmax(xWᵀ + b) − y)ᵀ x / B; x (B, H), y (B, C)
        (Σ_c y_c is an example's weight: 1 for a distribution)."""
        p = torch.softmax(HeadProxy.forward(params, x), -1)  # (K, B, C)
        d = (y.sum(-1, keepdim=True) * p - y) / x.shape[0]
        return {"weight": d.transpose(-1, -2) @ x, "bias": d.sum(-2)}

    def init_params(self, gen: torch.Generator, k: int) -> dict:
        h, like = self.real.shape[1], self.real
        w = torch.randn(k, self.num_classes, h, generator=gen, dtype=like.dtype) * 0.02
        return {"weight": w.to(like.device), "bias": torch.zeros(k, self.num_classes, dtype=like.dtype,
                                                                  device=like.device)}

    def real_batch(self, gen: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = _draw(gen, len(self.real_labels), size).to(self.real.device)
        return self.real[idx], self.real_labels[idx]


class FullProxy:
    """The whole classifier through ``functional_call``; inputs {"input_ids" | "inputs_embeds", "attention_mask"}.

    Trained in the unroll: everything but the word-embedding table (frozen: 30k rows that a small set barely
    touches, and the table TDD's synthetic embeddings live in). Each initialisation draws a fresh head (N(0, 0.02),
    zero bias, as the evaluation protocol) on the pre-trained body. Dropout is off: the unroll is deterministic.
    """

    batched = False

    def __init__(self, model: torch.nn.Module, real: dict[str, torch.Tensor], real_labels: torch.Tensor):
        self.model = model.eval().requires_grad_(False)
        self.causal = is_causal(model)
        self.dtype = next(model.parameters()).dtype
        table = model.get_input_embeddings().weight
        named = dict(model.named_parameters())
        self.frozen = {k: v for k, v in named.items() if v is table}
        self.head = {k: named[k] for k in head_param_names(model)}
        self.body = {k: v for k, v in named.items() if k not in self.frozen and k not in self.head}
        self.real = real
        self.real_labels = real_labels

    def forward(self, params: dict, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        kw = dict(inputs)
        kw["attention_mask"] = additive_mask(inputs["attention_mask"], self.causal, self.dtype)
        return functional_call(self.model, {**self.frozen, **params}, (), kw).logits  # (B, C)

    def init_params(self, gen: torch.Generator, k: int) -> list[dict]:
        out = []
        for _ in range(k):
            head = {n: (torch.randn(v.shape, generator=gen, dtype=v.dtype) * 0.02).to(v.device) if n.endswith("weight")
                    else torch.zeros_like(v) for n, v in self.head.items()}
            out.append({**self.body, **head})
        return out

    def real_batch(self, gen: torch.Generator, size: int) -> tuple[dict, torch.Tensor]:
        idx = _draw(gen, len(self.real_labels), size).to(self.real_labels.device)
        batch = take(self.real, idx)
        width = int(batch["attention_mask"].sum(1).max())  # drop all-padding columns
        return {k: v[:, :width] for k, v in batch.items()}, self.real_labels[idx]


def _draw(gen: torch.Generator, n: int, size: int) -> torch.Tensor:
    return torch.randperm(n, generator=gen)[:size] if size < n else torch.arange(n)


def real_pool(task: TaskData, per_class: int, seed: int) -> list[Example]:
    """A seeded, class-stratified sample of the *training* split: the outer loss's real data."""
    out: list[Example] = []
    for c, group in enumerate(task.by_class("train")):
        out += random.Random(derive_seed(seed, "real pool", c)).sample(group, min(per_class, len(group)))
    return out


def build_proxy(ucfg: UnrollConfig, task: TaskData, device, seed: int,
                body: torch.nn.Module | None = None) -> HeadProxy | FullProxy:
    """The proxy with its real pool; ``body`` (head mode) is the frozen feature model, loaded when not given."""
    pool = real_pool(task, ucfg.real_per_class, seed)
    texts = [join_pair(e.text, e.text_pair) for e in pool]
    labels = torch.tensor([e.label for e in pool], device=device)
    if ucfg.mode == "head":
        body = body or load_model(ucfg.learner, "base", device=device)
        feats = embed(texts, ucfg.learner, device, ucfg.pooling, max_length=ucfg.max_length, model=body)
        return HeadProxy(feats.to(device), labels, task.num_classes)
    model = load_model(ucfg.learner, "classifier", task.num_classes, device)
    return FullProxy(model, encode(load_tokenizer(ucfg.learner), texts, ucfg.max_length, device), labels)


def syn_inputs(proxy: HeadProxy | FullProxy, texts: list[str], ucfg: UnrollConfig, device,
               body: torch.nn.Module | None = None) -> Inputs:
    """The synthetic texts in the proxy's input form: standardised features (head) or token ids (full)."""
    if isinstance(proxy, HeadProxy):
        feats = embed(texts, ucfg.learner, device, ucfg.pooling, max_length=ucfg.max_length, model=body)
        return proxy.standardise(feats.to(device))
    return encode(load_tokenizer(ucfg.learner), texts, ucfg.max_length, device)


def inner_batches(gen: torch.Generator, n: int, ucfg: UnrollConfig, device) -> torch.Tensor | None:
    """(steps, batch_size) synthetic indices for one outer step, or None when the whole set fits in a batch."""
    if n <= ucfg.batch_size:
        return None
    return torch.stack([torch.randperm(n, generator=gen)[: ucfg.batch_size] for _ in range(ucfg.steps)]).to(device)


# --------------------------------------------------------------------------- outer loop


def outer_step(objective: Callable[[dict], torch.Tensor], learn: dict[str, torch.Tensor],
               opt: torch.optim.Optimizer) -> float:
    """Differentiate ``objective`` (through the unroll) with respect to every tensor in ``learn``; one Adam step."""
    grads, loss = grad_and_value(objective)(learn)
    if not torch.isfinite(loss):
        raise DilmError("the unrolled outer loss is not finite; lower the unroll lr (--inner-lr) or the outer lr")
    for k, p in learn.items():
        p.grad = grads[k]
    opt.step()
    return float(loss.detach())


def unroll_lr(learn: dict[str, torch.Tensor], ucfg: UnrollConfig) -> torch.Tensor | float:
    """The unroll's step size: exp of the learned log lr, or the fixed one."""
    return learn["log_lr"].exp() if "log_lr" in learn else ucfg.lr


def learned_lr(learn: dict[str, torch.Tensor], ucfg: UnrollConfig) -> float:
    return math.exp(float(learn["log_lr"].detach())) if "log_lr" in learn else ucfg.lr


def outer_loop(proxy: HeadProxy | FullProxy, learn: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
               loss_fn: Callable, n_syn: int, ucfg: UnrollConfig, steps: int, seed: int, device, desc: str = "",
               progress: bool = False, project: Callable[[], None] | None = None) -> list[float]:
    """``steps`` outer steps. Each draws fresh learners, a real batch and the unroll's synthetic batches, then
    takes one Adam step on ``learn`` through ``loss_fn(learn, params0, real, real_labels, batches)`` and calls
    ``project`` (the labels' projections, :func:`dilm.labelspace.after_step`)."""
    gen = torch.Generator().manual_seed(seed)
    log_lr0 = math.log(ucfg.lr)
    losses = []
    with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels have no double backward
        for _ in tqdm(range(steps), desc=desc, disable=not progress):
            params0 = proxy.init_params(gen, ucfg.learners)
            real, real_y = proxy.real_batch(gen, ucfg.real_batch)
            batches = inner_batches(gen, n_syn, ucfg, device)
            objective = partial(loss_fn, params0=params0, real=real, real_labels=real_y, batches=batches)
            losses.append(outer_step(objective, learn, opt))
            if project is not None:
                project()
            if "log_lr" in learn:  # a learned log step size stays within ±LOG_LR_RANGE of its start
                with torch.no_grad():
                    learn["log_lr"].clamp_(log_lr0 - LOG_LR_RANGE, log_lr0 + LOG_LR_RANGE)
    return losses


def loss_summary(losses: list[float], k: int = 10) -> dict:
    """Mean outer loss over the first and the last ``k`` steps (one real batch is noisy)."""
    if not losses:
        return {"outer_loss_first": None, "outer_loss_last": None}
    return {"outer_loss_first": float(np.mean(losses[:k])), "outer_loss_last": float(np.mean(losses[-k:]))}
