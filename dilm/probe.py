"""Frozen-encoder probes: sentence embeddings of a frozen encoder + scikit-learn logistic regression.

Two uses:

* **label agreement** (:class:`LabelProbe`): a probe fitted once per task on the training split (cached on disk
  under ``DILM_CACHE/probes``, keyed by the task's content and the encoder) scores the fraction of generated texts
  that it assigns to the class they were generated for. It tells on-label generators from fluent-but-off-label
  ones without training anything per call.
* **the ``<encoder>-probe`` evaluation architecture** (:func:`fit_logreg`): a logistic regression trained on a
  synthetic set's embeddings and tested on the task's test split — a cheap evaluator that separates good sets
  from bad ones on a CPU (dilm/evaluate.py).

Embeddings are the encoder's masked-mean last layer (:func:`dilm.features.embed`), L2-normalised, as
sentence-transformers' all-MiniLM-L6-v2 is used.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch

from dilm.features import embed
from dilm.files import cache_dir, made_once
from dilm.tasks import Example, TaskData
from dilm.text import join_pair

PROBE_C = 1.0  # inverse L2 strength of every probe's logistic regression (unit-norm features)


def join(e) -> str:
    return join_pair(e.text, e.text_pair)


def sentence_embeddings(texts: list[str], encoder: str, device, model: torch.nn.Module | None = None,
                        cache: bool = False) -> np.ndarray:
    """(len(texts), H) float64, unit rows: the frozen encoder's mean-pooled last layer (``cache``: fixed texts, kept
    on disk by :func:`dilm.features.embed`)."""
    x = embed(texts, encoder, device, model=model, cache=cache).double()
    return torch.nn.functional.normalize(x, dim=1).numpy()


def fit_logreg(x: np.ndarray, targets: np.ndarray, seed: int = 0):
    """Logistic regression on features ``x`` (n, H) with soft ``targets`` (n, C): every example becomes one row per
    class it has mass on, weighted by that mass (a hard label is one row of weight 1). Returns the fitted model, or
    the single class when only one has mass."""
    from sklearn.linear_model import LogisticRegression

    rows, labels = np.nonzero(targets > 0)
    if len(set(labels.tolist())) < 2:
        return int(labels[0])
    clf = LogisticRegression(C=PROBE_C, max_iter=2000, random_state=seed)
    return clf.fit(x[rows], labels, sample_weight=targets[rows, labels])


def predict(model, x: np.ndarray) -> np.ndarray:
    return np.full(len(x), model) if isinstance(model, int) else model.predict(x)


def task_fingerprint(examples: list[Example], label_names) -> str:
    """Content hash of labelled examples (texts, pairs, labels, label names): a cache key that changes with the data."""
    h = hashlib.sha256(json.dumps(list(label_names)).encode())
    for e in examples:
        h.update(json.dumps([e.text, e.text_pair, e.label]).encode())
    return h.hexdigest()[:16]


class LabelProbe:
    """A probe fitted on a task's training split; ``agreement`` scores generated texts against their classes."""

    def __init__(self, encoder: str, clf, device, model: torch.nn.Module | None = None):
        self.encoder, self.clf, self.device, self.model = encoder, clf, device, model

    @classmethod
    def for_task(cls, task: TaskData, encoder: str = "minilm-l6", device="cpu", model: torch.nn.Module | None = None,
                 max_examples: int = 0) -> LabelProbe:
        """Fitted once per (task content, encoder, size) on the training split — all of it, or a seeded sample of
        ``max_examples`` (SST-2's 67k texts take ~10 min to embed on 2 CPU cores, seconds on a GPU) — then read
        from the disk cache."""
        import joblib

        train = task.train
        if 0 < max_examples < len(train):
            train = random.Random(0).sample(train, max_examples)
        key = hashlib.sha256(f"{encoder}|{task_fingerprint(train, task.label_names)}|C={PROBE_C}".encode())
        path = cache_dir() / "probes" / f"{key.hexdigest()[:20]}.joblib"

        def fit(tmp: Path) -> None:  # concurrent trials fit it once
            x = sentence_embeddings([join(e) for e in train], encoder, device, model)
            joblib.dump(fit_logreg(x, np.eye(task.num_classes)[[e.label for e in train]]), tmp)

        made_once(path, fit)
        return cls(encoder, joblib.load(path), device, model)

    def predict(self, texts: list[str]) -> np.ndarray:
        return predict(self.clf, sentence_embeddings(texts, self.encoder, self.device, self.model))

    def probabilities(self, items: list, num_classes: int) -> np.ndarray:
        """(len(items), num_classes): the probe's class probabilities of items (with ``text``/``text_pair``)."""
        x = sentence_embeddings([join(s) for s in items], self.encoder, self.device, self.model)
        if isinstance(self.clf, int):  # fitted on one class only
            return np.eye(num_classes)[[self.clf] * len(items)]
        out = np.zeros((len(items), num_classes))
        out[:, self.clf.classes_] = self.clf.predict_proba(x)
        return out

    def agreement(self, by_class: list[list]) -> float:
        """Fraction (0–1) of the items (anything with ``text``/``text_pair``) of ``by_class[c]`` predicted as c."""
        items = [(c, join(s)) for c, group in enumerate(by_class) for s in group]
        if not items:
            return float("nan")
        pred = self.predict([t for _, t in items])
        return float(np.mean(pred == np.array([c for c, _ in items])))


__all__ = ["LabelProbe", "fit_logreg", "predict", "sentence_embeddings", "task_fingerprint", "PROBE_C"]
