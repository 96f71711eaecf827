"""Learned soft labels for a fixed set of texts, by unrolled differentiation through learner training.

Vocabulary (the unroll machinery lives in :mod:`dilm.unroll`, shared with :mod:`dilm.tdd`):

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

import math
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import torch

from dilm import DilmError
from dilm.device import pick_device
from dilm.features import embed
from dilm.labelspace import after_step, check_label_keys, learnable_labels, learned_labels, targets_of
from dilm.models import load_model
from dilm.options import option
from dilm.protocol import PROTOCOL
from dilm.selection import kmeans_nearest
from dilm.synset import SynSet
from dilm.tasks import Example, TaskData
from dilm.text import join_pair
from dilm.unroll import (
    FullProxy,
    HeadProxy,
    Inputs,
    UnrollConfig,
    build_proxy,
    functional_inner_grad,
    inner_batches,
    learned_lr,
    loss_summary,
    mean_unrolled_loss,
    outer_loop,
    real_pool,
    syn_inputs,
    take,
    unroll,
    unroll_lr,
)


@dataclass(frozen=True)
class SoftLabelConfig:
    steps: int = option(100, "outer steps (0: the hard labels as exact one-hots)")
    lr: float = option(0.05, "outer Adam step size on labels, log weights and log lr")
    max_shift: float = option(0.5, "most total-variation distance a label may move from its start (1: free)")
    init_smoothing: float = option(0.0, "labels start at (1-s)*onehot + s/C; 0: one-hot")
    weights: bool = option(False, "learn a per-example weight on the label distribution")
    max_weight: float = option(4.0, "learned weights stay in [1/max_weight, max_weight]")
    seed: int = option(0, "seed of the proxy initialisations, batches and real pool")
    device: str = option("auto", "auto, cpu or cuda[:N]")
    unroll: UnrollConfig = option(default_factory=UnrollConfig, help="the proxy learner and its unroll")
    progress: bool = option(False, "show a progress bar")

    def __post_init__(self):
        if self.steps < 0:
            raise DilmError(f"soft-label steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise DilmError(f"soft-label lr must be > 0, got {self.lr}")
        check_label_keys(self.max_shift, self.init_smoothing, self.max_weight)


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
                              max_length: int = PROTOCOL.max_length) -> SynSet:
    """``n_total`` real examples chosen over all classes at once (any number, also fewer than the classes): the
    examples nearest the centroids of a k-means (k = n_total, seeded) on the learner features of a class-balanced
    sample. Their hard labels cover at most ``n_total`` classes; :func:`learn_soft_labels` spreads them."""
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
