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

import argparse
import math
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from dilm import DilmError
from dilm.cli import add_task_args, command, task_from_args
from dilm.features import EMBED_POOLINGS, embed
from dilm.files import write_json
from dilm.labelspace import after_step, check_label_keys, learnable_labels, learned_labels, targets_of
from dilm.models import load_model, pick_device
from dilm.synset import SynSet, read_set, write_set
from dilm.tasks import Example, TaskData
from dilm.text import join_pair
from dilm.unroll import (
    INNER_OPTIMIZERS,
    MODES,
    SCHEDULES,
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
