"""Embedding-level text distillation (TDD), a same-architecture baseline beside DiLM (docs/method.md).

A TDD set is ``n = DPC × C`` (or ``total``, also fewer than the classes) free sequences of input word embeddings
``inputs_embeds`` (n, T, H) — fed to the learner in place of its word-embedding lookup, so position and token-type
embeddings and the embedding LayerNorm still apply — each with a learnable label distribution (n, C)
(:mod:`dilm.labelspace`), and one learnable unroll step size. They are optimised with the machinery of
:mod:`dilm.softlabel`: a proxy learner is unrolled on the synthetic embeddings with ``torch.func``
and the outer loss is its cross-entropy on real *training* mini-batches.

* ``head`` mode (default): the learner's body is frozen; the synthetic features are its pooled outputs on the
  embeddings (differentiable in them) and a linear head is unrolled on those. ``full``: the whole classifier.
* Only a model with the same embedding table can read the set — hence "evaluable only on <learner>". It is a
  baseline and an upper-bound reference, not a product output.

On disk, ``OUT.pt`` holds the embeddings, attention mask, soft labels, label names and meta
(``{"tdd_learner": <model>, ...}``); ``OUT.jsonl`` is a *reading* of it (each position's nearest vocabulary token,
cosine) with the soft labels, and ``OUT.meta.json`` carries ``tdd_learner`` so that ``dilm evaluate OUT.jsonl``
refuses it rather than scoring the readings as if they were the set.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dilm import DilmError
from dilm.device import pick_device
from dilm.ensemble import Ensemble, predict_ensemble, train_ensemble
from dilm.evaluate import ArchScores, Scores
from dilm.files import atomic_path, write_json
from dilm.labelspace import after_step, check_label_keys, learnable_labels, learned_labels, targets_of
from dilm.models import is_causal, load_model, load_tokenizer, resolve_model
from dilm.options import option
from dilm.protocol import EvalConfig
from dilm.seeds import derive_seed
from dilm.synset import SynExample, SynSet, write_set
from dilm.tasks import TaskData, check_dpc
from dilm.text import additive_mask, join_pair
from dilm.unroll import (
    HeadProxy,
    UnrollConfig,
    build_proxy,
    learned_lr,
    loss_summary,
    mean_unrolled_loss,
    outer_loop,
    unroll_lr,
)

INITS = ("real", "random")


@dataclass(frozen=True)
class TDDConfig:
    dpc: int = option(1, "synthetic sequences per class")
    total: int | None = option(None, "instead of dpc: this many sequences over all classes (fewer than the classes "
                                     "allowed), each starting from one class drawn without replacement")
    seq_len: int = option(32, "T: positions per synthetic sequence")
    steps: int = option(200, "outer steps")
    lr: float = option(0.05, "Adam step on embeddings, in units of the table's std")
    label_lr: float = option(0.05, "Adam step on labels and the log unroll lr")
    max_shift: float = option(1.0, "most total-variation distance a label may move from its start (1: free, as "
                                   "the paper)")
    init_smoothing: float = option(0.0, "labels start at (1-s)*onehot + s/C; 0: one-hot")
    init: str = option("real", "real: embeddings of random real examples; random", choices=INITS)
    seed: int = option(0, "seed of the initial sequences, proxy initialisations and batches")
    device: str = option("auto", "auto, cpu or cuda[:N]")
    unroll: UnrollConfig = option(default_factory=UnrollConfig, help="the proxy learner and its unroll")
    progress: bool = option(False, "show a progress bar")

    def __post_init__(self):
        if self.dpc < 1 or self.seq_len < 2 or self.steps < 0:
            raise DilmError("TDD needs dpc >= 1, seq_len >= 2 and steps >= 0")
        if not self.lr > 0 or not self.label_lr > 0:
            raise DilmError("TDD lr and label_lr must be > 0")
        if self.total is not None and self.total < 1:
            raise DilmError(f"TDD total must be >= 1, got {self.total}")
        check_label_keys(self.max_shift, self.init_smoothing, 1.0)
        if self.init not in INITS:
            raise DilmError(f"unknown TDD init {self.init!r}; known: {', '.join(INITS)}")


@dataclass(frozen=True)
class TDDSet:
    inputs_embeds: torch.Tensor  # (n, T, H) float32, CPU
    attention_mask: torch.Tensor  # (n, T) 0/1
    soft_labels: torch.Tensor  # (n, C), rows sum to 1
    label_names: tuple[str, ...]
    meta: dict  # "tdd_learner": the only model that can read the embeddings
    readings: tuple[str, ...] = ()  # nearest-token readings, for people (never trained on)

    def __len__(self) -> int:
        return self.inputs_embeds.shape[0]

    @property
    def learner(self) -> str:
        return self.meta["tdd_learner"]


# --------------------------------------------------------------------------- distillation


def check_tdd_learner(learner: str) -> None:
    if resolve_model(learner).family != "encoder":
        raise DilmError(f"TDD needs an encoder learner (its classifier reads the first position); {learner} is a "
                        "decoder")


def init_sequences(task: TaskData, cfg: TDDConfig, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Initial embeddings (n, T, H), attention mask (n, T) and class ids: DPC per class in class order, or with
    ``total`` one sequence per class for ``total`` classes drawn at random (all classes, then again, when
    ``total`` exceeds them)."""
    tok = load_tokenizer(cfg.unroll.learner)
    groups = task.by_class("train")
    if cfg.total is None:
        labels = [c for c in range(task.num_classes) for _ in range(cfg.dpc)]
    else:
        rng = random.Random(cfg.seed)
        labels = [c for _ in range(-(-cfg.total // task.num_classes)) for c in rng.sample(range(task.num_classes),
                                                                                          task.num_classes)]
        labels = sorted(labels[: cfg.total])
    picked = []
    for c in sorted(set(labels)):
        picked += random.Random(derive_seed(cfg.seed, "tdd init", c)).sample(groups[c], labels.count(c))
    enc = tok([join_pair(e.text, e.text_pair) for e in picked], padding="max_length", truncation=True,
              max_length=cfg.seq_len, return_tensors="pt", padding_side="right")
    ids, mask = enc["input_ids"].to(table.device), enc["attention_mask"].to(table.device)
    if cfg.init == "real":
        return table[ids].detach().clone(), mask, labels
    gen = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn(*ids.shape, table.shape[1], generator=gen) * table.std().item()
    return noise.to(table.device), torch.ones_like(mask), labels


def pooled_features(body: torch.nn.Module, embeds: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Last-layer features of input embeddings (n, T, H) → (n, H), as :func:`dilm.features.embed` pools them."""
    dtype = next(body.parameters()).dtype
    states = body(inputs_embeds=embeds, attention_mask=additive_mask(mask, is_causal(body), dtype))
    if pooling == "pooler":
        return states.pooler_output
    hidden = states.last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def distill_tdd(task: TaskData, cfg: TDDConfig, device=None) -> TDDSet:
    ucfg = cfg.unroll
    check_tdd_learner(ucfg.learner)
    device = pick_device(str(device or cfg.device))
    if cfg.total is None:
        check_dpc(task, cfg.dpc)
    body = load_model(ucfg.learner, "base", device=device).eval().requires_grad_(False) if ucfg.mode == "head" else None
    proxy = build_proxy(ucfg, task, device, cfg.seed, body)
    table = (body or proxy.model).get_input_embeddings().weight.detach()  # (V, H)
    embeds, mask, labels = init_sequences(task, cfg, table)

    def as_inputs(e: torch.Tensor):
        if isinstance(proxy, HeadProxy):
            return proxy.standardise(pooled_features(body, e, mask, ucfg.pooling))  # (n, H)
        return {"inputs_embeds": e, "attention_mask": mask}

    learn, y0 = learnable_labels(labels, task.num_classes, cfg.init_smoothing, False, device, embeds.dtype)
    learn["embeds"] = embeds.requires_grad_()
    if ucfg.learn_lr:
        learn["log_lr"] = torch.tensor(math.log(ucfg.lr), device=device, requires_grad=True)
    groups = [{"params": [learn["embeds"]], "lr": cfg.lr * table.std().item()},
              {"params": [v for k, v in learn.items() if k != "embeds"], "lr": cfg.label_lr}]
    opt = torch.optim.Adam(groups)

    def loss_fn(p, params0, real, real_labels, batches):
        return mean_unrolled_loss(proxy, params0, as_inputs(p["embeds"]), targets_of(p), unroll_lr(p, ucfg), real,
                                  real_labels, ucfg, batches)

    losses = outer_loop(proxy, learn, opt, loss_fn, len(labels), ucfg, cfg.steps, cfg.seed, device, "tdd",
                        cfg.progress, partial(after_step, learn, y0, cfg.max_shift, 1.0))
    embeds = learn["embeds"].detach()
    meta = {"tdd_learner": ucfg.learner, "task": task.name, "config": asdict(cfg),
            "learned_lr": learned_lr(learn, ucfg), **loss_summary(losses)}
    soft = torch.tensor(learned_labels(learn)[0]).float()
    return TDDSet(embeds.float().cpu(), mask.cpu(), soft.cpu(), task.label_names, meta,
                  tuple(nearest_tokens(embeds, mask, table, ucfg.learner)))


@torch.no_grad()
def nearest_tokens(embeds: torch.Tensor, mask: torch.Tensor, table: torch.Tensor, learner: str) -> list[str]:
    """Each attended position's nearest vocabulary token by cosine similarity, joined: a reading of the set."""
    tok = load_tokenizer(learner)
    unit = F.normalize(table.float(), dim=-1)  # (V, H)
    out = []
    for e, m in zip(embeds, mask):  # (T, H), (T,)
        ids = (F.normalize(e.float(), dim=-1) @ unit.T).argmax(-1)[m.bool()]
        out.append(" ".join(tok.convert_ids_to_tokens(ids.tolist())) or "[empty]")
    return out


# --------------------------------------------------------------------------- files


def tdd_paths(out: str | Path) -> dict[str, Path]:
    """OUT, OUT.pt or OUT.jsonl → the three files of a TDD set."""
    out = Path(out)
    base = out.with_suffix("") if out.suffix in (".pt", ".jsonl") else out
    return {"pt": base.with_name(base.name + ".pt"), "jsonl": base.with_name(base.name + ".jsonl"),
            "meta": base.with_name(base.name + ".meta.json")}


def save_tdd(tdd: TDDSet, out: str | Path) -> dict[str, Path]:
    paths = tdd_paths(out)
    paths["pt"].parent.mkdir(parents=True, exist_ok=True)
    blob = {"inputs_embeds": tdd.inputs_embeds, "attention_mask": tdd.attention_mask,
            "soft_labels": tdd.soft_labels, "label_names": list(tdd.label_names), "meta": tdd.meta,
            "readings": list(tdd.readings)}
    with atomic_path(paths["pt"]) as tmp:
        torch.save(blob, tmp)
    readings = tdd.readings or tuple(f"[sequence {i}]" for i in range(len(tdd)))
    rows = [SynExample(text, int(s.argmax()), None, tuple(s.tolist()))
            for text, s in zip(readings, tdd.soft_labels.double())]
    write_set(paths["jsonl"], SynSet(rows, tdd.label_names))
    write_json(paths["meta"], {**tdd.meta, "embeddings": paths["pt"].name,
                               "note": "the .jsonl holds nearest-token readings; the set is the .pt embeddings"})
    return paths


def load_tdd(path: str | Path) -> TDDSet:
    pt = tdd_paths(path)["pt"]
    if not pt.exists():
        raise DilmError(f"TDD set {pt} does not exist")
    blob = torch.load(pt, map_location="cpu", weights_only=True)
    if "tdd_learner" not in blob.get("meta", {}):
        raise DilmError(f"{pt} is not a TDD set (no tdd_learner in its meta)")
    return TDDSet(blob["inputs_embeds"], blob["attention_mask"], blob["soft_labels"], tuple(blob["label_names"]),
                  blob["meta"], tuple(blob.get("readings", ())))


# --------------------------------------------------------------------------- evaluation


def evaluate_tdd(path: str | Path | TDDSet, task: TaskData, learner: str, cfg: EvalConfig) -> Scores:
    """Train ``cfg.seeds`` fresh learners (same architecture) on the embeddings by the protocol; test accuracy.

    The word-embedding table is left out of the optimiser: no gradient reaches it from ``inputs_embeds``.
    """
    tdd = path if isinstance(path, TDDSet) else load_tdd(path)
    where = "TDD set" if isinstance(path, TDDSet) else f"TDD set {path}"
    if learner != tdd.learner:
        raise DilmError(f"{where} is evaluable only on {tdd.learner} (its examples are that model's input "
                        f"embeddings, not text), not on {learner}")
    if tdd.label_names != task.label_names:
        raise DilmError(f"{where} labels {list(tdd.label_names)} do not match task {task.name} "
                        f"labels {list(task.label_names)}")
    device = pick_device(cfg.device)
    test = task.test[: cfg.test_limit] if cfg.test_limit else task.test
    gold = np.array([e.label for e in test])
    base = load_model(learner, "classifier", task.num_classes, device)
    if base.get_input_embeddings().weight.shape[1] != tdd.inputs_embeds.shape[-1]:
        raise DilmError(f"{where}: embedding width {tdd.inputs_embeds.shape[-1]} does not match {learner}")
    scores = ArchScores()
    seeds = list(range(cfg.seeds))
    for i in range(0, len(seeds), cfg.ensemble):
        for preds in _train_on_embeddings(learner, base, tdd, seeds[i: i + cfg.ensemble], test, cfg, device):
            scores.record(preds, gold, f1=task.num_classes == 2 and task.is_pair)
    return Scores({learner: scores})


def _train_on_embeddings(learner: str, base: torch.nn.Module, tdd: TDDSet, seeds: list[int], test, cfg: EvalConfig,
                         device) -> list[np.ndarray]:
    """The protocol's loop (:func:`dilm.ensemble.train_ensemble`) on ``inputs_embeds`` in place of token ids; every
    member trains on the same set, so the data is an expanded view (N, n, ...). The word-embedding table is frozen."""
    base.train()
    ens = Ensemble(base, seeds, device)
    table = base.get_input_embeddings().weight
    table_key = next(k for k, v in base.named_parameters() if v is table)
    n = len(seeds)
    inputs = {"inputs_embeds": tdd.inputs_embeds.to(device).expand(n, -1, -1, -1),  # (N, n, T, H)
              "attention_mask": tdd.attention_mask.to(device).expand(n, -1, -1)}  # (N, n, T)
    targets = tdd.soft_labels.to(device).expand(n, -1, -1)  # (N, n, C)
    train_ensemble(ens, inputs, targets, [len(tdd)] * n, seeds, cfg, device, frozen=frozenset({table_key}))
    return predict_ensemble(ens, load_tokenizer(learner), test, cfg, device)
