"""``tfidf-logreg``: TF-IDF + logistic regression trained from scratch on the set (soft labels by weighted
expansion: one row per class, weighted by its probability)."""

from __future__ import annotations

import re

import numpy as np

from dilm.archs.base import ArchKind, EvalContext, Predictions
from dilm.synset import SynSet
from dilm.tasks import Example
from dilm.text import join_pair


def tfidf_logreg(synset: SynSet, seed: int, test: list[Example]) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    texts, labels, weights = [], [], []
    for e in synset.examples:  # soft labels: one row per class, weighted by its probability
        for c, p in enumerate(e.target(synset.num_classes)):
            if p > 0:
                texts.append(join_pair(e.text, e.text_pair))
                labels.append(c)
                weights.append(p)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    vec.fit([join_pair(e.text, e.text_pair) for e in synset.examples])  # IDF over the set's texts, not the expansion
    x = vec.transform(texts)
    if len(set(labels)) < 2:  # a one-class set predicts that class
        return np.full(len(test), labels[0])
    clf = LogisticRegression(C=10.0, max_iter=1000, random_state=seed)
    clf.fit(x, labels, sample_weight=weights)
    return clf.predict(vec.transform([join_pair(e.text, e.text_pair) for e in test]))


def score(ctx: EvalContext, model: None, sets: list[SynSet]) -> Predictions:
    for s, seed in ctx.jobs(sets):
        yield tfidf_logreg(s, seed, ctx.test), 1


KIND = ArchKind("tfidf", "tfidf-logreg", re.compile(r"tfidf-logreg"), score)
