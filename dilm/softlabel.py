"""Learned soft labels for a fixed set of texts, by unrolled differentiation through learner training.

Vocabulary (shared with :mod:`dilm.tdd`):

* **labels** ``y`` (n, C) — the learned parameters: a distribution per example, starting at the hard labels
  exactly (one-hot), projected back onto the simplex and within ``max_shift`` (total variation) of the start
  after every outer step; optionally a learned per-example weight (:mod:`dilm.labelspace`).
* **proxy learner** — the learner that is unrolled. ``head`` (the default, cheap on CPU): a linear classifier on
  frozen learner features (:func:`dilm.features.embed`, standardised on real data so that ``|x| ≈ 1``). Its
  default features are what the evaluated classifier's head reads — the model's own [CLS] pooler, at the
  evaluation's token limit (128) — so labels are learned for the learner that is evaluated, not for mean-pooled
  features of shorter texts. ``full``: the whole classifier (pre-trained body + fresh head, word-embedding table
  frozen) through ``torch.func.functional_call`` — the closest match, affordable on a GPU.
* **unroll** — ``UnrollConfig.steps`` differentiable learner updates (explicit SGD or Adam, constant step or the
  protocol's warm-up/decay) on the synthetic set, from a fresh random head, written with ``torch.func.grad`` so
  that they can be differentiated again.
* **outer loss** — cross-entropy of the unrolled learner on a mini-batch of *real training* examples (never the
  test split), averaged over ``learners`` fresh initialisations; its gradient with respect to ``z`` (and to the
  log learning rate of the unroll, when it is learned) drives an Adam step: one **outer step**.

The evaluation protocol (:mod:`dilm.evaluate`) trains on the soft labels with soft cross-entropy; the learned
learning rate belongs to the proxy unroll and is recorded in the set's meta. :meth:`SoftLabeler.proxy_accuracy`
evaluates the paper's way instead: fresh proxies trained by the unroll itself with the learned step size.
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from dilm import DilmError
from dilm.cli import add_task_args, command, task_from_args
from dilm.ensemble import linear_warmup_decay
from dilm.features import EMBED_POOLINGS, embed
from dilm.files import write_json
from dilm.labelspace import after_step, check_label_keys, learnable_labels, learned_labels, targets_of
from dilm.models import head_param_names, is_causal, load_model, load_tokenizer, pick_device
from dilm.seeds import derive_seed
from dilm.synset import SynSet, read_set, write_set
from dilm.tasks import Example, TaskData
from dilm.text import additive_mask, encode, join_pair

MODES = ("head", "full")
INNER_OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "protocol")  # protocol: the evaluation's linear warm-up over half, then decay
# Unroll step size when none is given: head mode sees |x| ≈ 1 features; full mode moves a pre-trained body.
DEFAULT_INNER_LR = {("head", "sgd"): 1.0, ("head", "adam"): 0.02, ("full", "sgd"): 0.01, ("full", "adam"): 1e-3}
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
LOG_LR_RANGE = 3.0  # a learned log step size stays within ±3 of its start (e^3 ≈ 20×): the unroll cannot blow up

Inputs = torch.Tensor | dict[str, torch.Tensor]  # features (B, H) in head mode, tokenizer-style dicts in full mode


@dataclass(frozen=True)
class UnrollConfig:
    """The proxy learner and how it is unrolled; shared by soft-label learning and TDD."""

    learner: str = field(default="minilm-l6", metadata={"help": "model whose features / body the proxy uses"})
    mode: str = field(default="head", metadata={"help": "head: linear head on frozen features; full: whole model"})
    pooling: str = field(default="pooler", metadata={"help": "head-mode features: pooler (the classifier's own "
                                                                "[CLS] pooler, as evaluated), mean or cls"})
    steps: int = field(default=20, metadata={"help": "differentiable learner steps per outer step"})
    optimizer: str = field(default="sgd", metadata={"help": "unrolled update: sgd or adam"})
    schedule: str = field(default="constant", metadata={"help": "unroll step size: constant or protocol "
                                                                "(warm-up over half the steps, then decay)"})
    lr: float | None = field(default=None, metadata={"help": "unroll step size (None: DEFAULT_INNER_LR)"})
    learn_lr: bool = field(default=True, metadata={"help": "learn the unroll's (log) step size too"})
    learners: int = field(default=4, metadata={"help": "fresh learner initialisations per outer step"})
    batch_size: int = field(default=64, metadata={"help": "synthetic examples per unroll step (set when smaller)"})
    real_per_class: int = field(default=500, metadata={"help": "real training examples per class in the pool"})
    real_batch: int = field(default=256, metadata={"help": "real examples per outer loss"})
    max_length: int = field(default=128, metadata={"help": "token limit of real and synthetic texts "
                                                                  "(the evaluation protocol's: 128)"})

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


@dataclass(frozen=True)
class SoftLabelConfig:
    steps: int = field(default=100, metadata={"help": "outer steps (0: the hard labels as exact one-hots)"})
    lr: float = field(default=0.05, metadata={"help": "outer Adam step size on labels, log weights and log lr"})
    max_shift: float = field(default=0.5, metadata={"help": "most total-variation distance a label may move from "
                                                           "its start (1: free)"})
    init_smoothing: float = field(default=0.0, metadata={"help": "labels start at (1-s)*onehot + s/C; 0: one-hot"})
    weights: bool = field(default=False, metadata={"help": "learn a per-example weight on the label distribution"})
    max_weight: float = field(default=4.0, metadata={"help": "learned weights stay in [1/max_weight, max_weight]"})
    seed: int = 0
    device: str = "auto"
    unroll: UnrollConfig = field(default_factory=UnrollConfig)
    progress: bool = False

    def __post_init__(self):
        if self.steps < 0:
            raise DilmError(f"soft-label steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise DilmError(f"soft-label lr must be > 0, got {self.lr}")
        check_label_keys(self.max_shift, self.init_smoothing, self.max_weight)


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
        lr_t = lr * linear_warmup_decay(t, steps, 0.5) if schedule == "protocol" else lr
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


class SoftLabeler:
    """Learns soft labels for sets of one task; the proxy (feature model, real pool) is built once."""

    def __init__(self, task: TaskData, cfg: SoftLabelConfig, device=None):
        self.task, self.cfg = task, cfg
        self.device = pick_device(str(device or cfg.device))
        self._proxy = self._body = None
        self._test_inputs: dict[tuple[str, ...], Inputs] = {}

    def _build(self) -> None:
        ucfg = self.cfg.unroll
        if ucfg.mode == "head":
            self._body = load_model(ucfg.learner, "base", device=self.device).eval().requires_grad_(False)
        self._proxy = build_proxy(ucfg, self.task, self.device, self.cfg.seed, self._body)

    def __call__(self, synset: SynSet) -> SynSet:
        """The same texts with learned soft labels; meta records the learned unroll lr and the outer losses."""
        task, cfg, ucfg, device = self.task, self.cfg, self.cfg.unroll, self.device
        if synset.label_names != task.label_names:
            raise DilmError(f"set labels {list(synset.label_names)} do not match task {task.name} "
                            f"labels {list(task.label_names)}")
        meta = {"config": asdict(cfg), "learner": ucfg.learner}
        labels = [e.label for e in synset.examples]
        if cfg.steps == 0:  # nothing learned: the starting labels, exactly
            learn, _ = learnable_labels(labels, synset.num_classes, cfg.init_smoothing, False, "cpu", torch.float64)
            return _with_meta(synset.with_soft_labels(*learned_labels(learn)), meta)
        proxy = self.proxy
        syn = syn_inputs(proxy, [join_pair(e.text, e.text_pair) for e in synset.examples], ucfg, device, self._body)
        learn, y0 = learnable_labels(labels, synset.num_classes, cfg.init_smoothing, cfg.weights, device, proxy.dtype)
        if ucfg.learn_lr:
            learn["log_lr"] = torch.tensor(math.log(ucfg.lr), device=device, dtype=proxy.dtype, requires_grad=True)
        opt = torch.optim.Adam(list(learn.values()), lr=cfg.lr)

        def loss_fn(p, params0, real, real_labels, batches):
            return mean_unrolled_loss(proxy, params0, syn, targets_of(p), unroll_lr(p, ucfg), real, real_labels,
                                      ucfg, batches)

        losses = outer_loop(proxy, learn, opt, loss_fn, len(synset), ucfg, cfg.steps, cfg.seed, device,
                            "soft labels", cfg.progress,
                            partial(after_step, learn, y0, cfg.max_shift, cfg.max_weight))
        meta.update(learned_lr=learned_lr(learn, ucfg), **loss_summary(losses))
        return _with_meta(synset.with_soft_labels(*learned_labels(learn)), meta)

    @property
    def proxy(self) -> HeadProxy | FullProxy:
        if self._proxy is None:
            self._build()
        return self._proxy

    def proxy_accuracy(self, synset: SynSet, seeds: int, test: list[Example], lr: float | None = None) -> list[float]:
        """The paper's evaluation: test accuracy of :meth:`proxy_predictions`, one per seed."""
        gold = torch.tensor([e.label for e in test])
        return [float((p == gold).double().mean()) for p in self.proxy_predictions(synset, seeds, test, lr)]

    @torch.no_grad()
    def proxy_predictions(self, synset: SynSet, seeds: int, test: list[Example],
                          lr: float | None = None) -> list[torch.Tensor]:
        """``seeds`` fresh proxy learners trained on the set by the unroll itself (its steps, optimiser, schedule
        and step size: ``lr``, else the set's learned one, else the configured one) → their ``test`` predictions."""
        ucfg, proxy, device = self.cfg.unroll, self.proxy, self.device
        lr = lr or synset.meta.get("soft_label", {}).get("learned_lr") or ucfg.lr
        syn = syn_inputs(proxy, [join_pair(e.text, e.text_pair) for e in synset.examples], ucfg, device, self._body)
        texts = tuple(join_pair(e.text, e.text_pair) for e in test)
        if texts not in self._test_inputs:  # one test split, many sets: encode it once
            self._test_inputs = {texts: syn_inputs(proxy, list(texts), ucfg, device, self._body)}
        test_x = self._test_inputs[texts]
        targets = torch.tensor([e.target(synset.num_classes) for e in synset.examples], device=device,
                               dtype=proxy.dtype)
        out = []
        for seed in range(seeds):
            gen = torch.Generator().manual_seed(seed)
            params0 = proxy.init_params(gen, 1)
            batches = inner_batches(gen, len(synset), ucfg, device)
            if proxy.batched:
                params = unroll(proxy.inner_grad, params0, syn, targets, lr, ucfg.steps, ucfg.optimizer, batches,
                                ucfg.schedule)
                preds = proxy.forward(params, test_x)[0].argmax(-1)
            else:
                params = unroll(functional_inner_grad(proxy.forward), params0[0], syn, targets, lr, ucfg.steps,
                                ucfg.optimizer, batches, ucfg.schedule)
                preds = torch.cat([proxy.forward(params, take(test_x, torch.arange(i, min(i + 256, len(test)))))
                                   .argmax(-1) for i in range(0, len(test), 256)])
            out.append(preds.cpu())
        return out


def learn_soft_labels(synset: SynSet, task: TaskData, cfg: SoftLabelConfig, device=None) -> SynSet:
    """``synset`` with soft labels learned by unrolled training of the proxy learner (see the module docstring)."""
    return SoftLabeler(task, cfg, device)(synset)


def _with_meta(synset: SynSet, softlabel_meta: dict) -> SynSet:
    return SynSet(synset.examples, synset.label_names, {**synset.meta, "soft_label": softlabel_meta})


# --------------------------------------------------------------------------- fewer examples than classes


def select_fewer_than_classes(task: TaskData, n_total: int, learner: str = "minilm-l6", seed: int = 0,
                              pooling: str = "mean", candidates_per_class: int = 500, device=None,
                              max_length: int = 128) -> SynSet:
    """``n_total`` real examples chosen over all classes at once (any number, also fewer than the classes): the
    examples nearest the centroids of a k-means (k = n_total, seeded) on the learner features of a class-balanced
    sample. Their hard labels cover at most ``n_total`` classes; :func:`learn_soft_labels` spreads them."""
    from dilm.coreset import kmeans_nearest

    if n_total < 1:
        raise DilmError(f"--total must be >= 1, got {n_total}")
    pool = real_pool(task, candidates_per_class, seed)
    if n_total > len(pool):
        raise DilmError(f"--total {n_total} is larger than the candidate pool ({len(pool)} examples)")
    feats = embed([join_pair(e.text, e.text_pair) for e in pool], learner, pick_device(str(device or "auto")), pooling,
                  max_length=max_length)
    picked = [pool[i] for i in kmeans_nearest(feats, n_total, seed)]
    return SynSet.from_examples(picked, task.label_names, method="kmeans-all-classes", total=n_total, seed=seed,
                                learner=learner, pooling=pooling)


def hard_label_ceiling(task: TaskData, n_total: int) -> float:
    """The best test accuracy (%) any hard-label set of ``n_total`` examples can reach: it predicts at most
    ``n_total`` classes, so at best it is right on the ``n_total`` largest test classes."""
    counts = sorted(np.bincount([e.label for e in task.test], minlength=task.num_classes), reverse=True)
    return 100.0 * sum(counts[:n_total]) / len(task.test)


# --------------------------------------------------------------------------- CLI


def add_unroll_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("unrolled learner")
    g.add_argument("--learner", default="minilm-l6")
    g.add_argument("--mode", default="head", choices=MODES,
                   help="head: linear head on frozen features (fast, default); full: the whole model")
    g.add_argument("--pooling", default="pooler", choices=EMBED_POOLINGS,
                   help="head-mode features; pooler: the classifier's own [CLS] pooler, what evaluation trains on")
    g.add_argument("--unroll", type=int, default=20, help="differentiable learner steps per outer step")
    g.add_argument("--inner-optimizer", default="sgd", choices=INNER_OPTIMIZERS)
    g.add_argument("--schedule", default="constant", choices=SCHEDULES,
                   help="unroll step size: constant, or protocol (warm-up over half, then decay)")
    g.add_argument("--inner-lr", type=float, default=None, help="unroll step size (default by mode/optimizer)")
    g.add_argument("--fixed-lr", action="store_true", help="do not learn the unroll step size")
    g.add_argument("--learners", type=int, default=4, help="fresh learner initialisations per outer step")
    g.add_argument("--real-per-class", type=int, default=500)
    g.add_argument("--real-batch", type=int, default=256)
    g.add_argument("--max-length", type=int, default=128, help="token limit (the evaluation protocol's: 128)")


def unroll_config_from_args(args) -> UnrollConfig:
    return UnrollConfig(learner=args.learner, mode=args.mode, pooling=args.pooling, steps=args.unroll,
                        optimizer=args.inner_optimizer, schedule=args.schedule, lr=args.inner_lr,
                        learn_lr=not args.fixed_lr,
                        learners=args.learners, real_per_class=args.real_per_class, real_batch=args.real_batch,
                        max_length=args.max_length)


def cmd_softlabel(args) -> int:
    cfg = SoftLabelConfig(steps=args.steps, lr=args.lr, max_shift=args.max_shift, init_smoothing=args.init_smoothing,
                          weights=args.weights, max_weight=args.max_weight, seed=args.seed, device=args.device,
                          unroll=unroll_config_from_args(args), progress=True)
    if (args.set is None) == (args.total is None):
        raise DilmError("give either a SET.jsonl or --total N")
    task = task_from_args(args)
    device = pick_device(cfg.device)
    if args.set is not None:
        synset = read_set(args.set, task.label_names, task.is_pair)
    else:
        synset = select_fewer_than_classes(task, args.total, cfg.unroll.learner, cfg.seed, cfg.unroll.pooling,
                                           device=device)
    labeler = SoftLabeler(task, cfg, device)
    out = labeler(synset)
    write_set(args.output, out)
    write_json(Path(args.output).with_suffix(".meta.json"),
               {**out.meta, "source": str(args.set) if args.set else f"--total {args.total}", "task": task.name})
    m = out.meta["soft_label"]
    trail = (f" (outer loss {m['outer_loss_first']:.3f} → {m['outer_loss_last']:.3f}, "
             f"learned unroll lr {m['learned_lr']:.3g})" if cfg.steps else "")
    print(f"soft labels for {len(out)} examples → {args.output}{trail}")
    if args.evaluate_proxy:  # the paper's setting: the proxy itself, trained with the learned step size
        test = task.test[: args.test_limit] if args.test_limit else task.test
        for name, s in (("hard labels", synset), ("soft labels", out)):
            accs = 100 * np.array(labeler.proxy_accuracy(s, args.eval_seeds, test, m.get("learned_lr")))
            print(f"proxy ({cfg.unroll.mode}, {cfg.unroll.pooling}, learned lr), {name}: accuracy "
                  f"{accs.mean():.1f} ± {accs.std(ddof=1) if len(accs) > 1 else 0.0:.1f} (n={len(accs)})")
    return 0


@command
def add_softlabel(sub) -> None:
    p = sub.add_parser("softlabel", help="learn soft labels for a set by unrolled learner training")
    p.add_argument("set", nargs="?", type=Path, help="JSONL set (coreset, DiLM set…); omit with --total")
    add_task_args(p)
    p.add_argument("--total", type=int, default=None,
                   help="instead of SET: N real examples over all classes (k-means), fewer than the classes allowed")
    p.add_argument("--steps", type=int, default=100, help="outer steps")
    p.add_argument("--lr", type=float, default=0.05, help="outer Adam step size")
    p.add_argument("--max-shift", type=float, default=0.5,
                   help="most total-variation distance a label may move from its start (1: free)")
    p.add_argument("--init-smoothing", type=float, default=0.0, help="labels start at (1-s)*onehot + s/C")
    p.add_argument("--weights", action="store_true", help="learn a per-example weight on the label distribution")
    p.add_argument("--max-weight", type=float, default=4.0, help="weights stay in [1/max_weight, max_weight]")
    p.add_argument("--evaluate-proxy", action="store_true",
                   help="score hard and soft labels by training the proxy itself with the learned step size")
    p.add_argument("--eval-seeds", type=int, default=5)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    add_unroll_args(p)
    p.add_argument("-o", "--output", required=True, type=Path)
    p.set_defaults(func=cmd_softlabel)
