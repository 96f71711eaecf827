"""Memorisation and contamination of a synthetic set: how many of its texts copy a training or a test text.

A "synthetic" set whose texts are copies of training texts is a coreset in disguise; one that copies test texts is
contaminated. For each synthetic text (a pair's two texts joined) this counts:

* **exact copies** — equal to a reference text after normalisation (lower case, whitespace collapsed);
* **near copies** — at least ``near`` (default 0.8) of the text's word n-grams (n = 4; texts shorter than n words
  count as one n-gram of all their words) occur in *one* reference text. Exact copies are near copies too.

Reference texts are indexed once (n-gram → the texts holding it), so checking a set against SST-2's 67k training
texts takes a second.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable

import numpy as np

NGRAM = 4
NEAR = 0.8


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    """Word n-grams of the normalised text; a text shorter than n words is one n-gram of all its words."""
    words = normalise(text).split()
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i: i + n]) for i in range(len(words) - n + 1)}


class CopyIndex:
    """Reference texts indexed by their n-grams; :meth:`overlap` is the largest share of a text's n-grams found in one
    reference text."""

    def __init__(self, texts: Iterable[str], n: int = NGRAM):
        self.n = n
        self.exact: set[str] = set()
        self.postings: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for i, text in enumerate(texts):
            self.exact.add(normalise(text))
            for g in ngrams(text, n):
                self.postings[g].append(i)

    def overlap(self, text: str) -> float:
        grams = ngrams(text, self.n)
        if not grams:
            return 0.0
        hits = Counter(i for g in grams for i in self.postings.get(g, ()))
        return max(hits.values(), default=0) / len(grams)

    def is_exact(self, text: str) -> bool:
        return normalise(text) in self.exact


def joined(item) -> str:
    """An example's or a sample's text as the index reads it (a pair's two texts joined by a space)."""
    return item.text if item.text_pair is None else f"{item.text} {item.text_pair}"


def copied(texts: list[str], index: CopyIndex, kind: str, near: float = NEAR) -> np.ndarray:
    """(N,) bool: which ``texts`` are ``exact`` copies of a reference text, or ``near`` copies (exact ones included)."""
    if kind == "exact":
        return np.array([index.is_exact(t) for t in texts], dtype=bool)
    if kind == "near":
        return np.array([index.is_exact(t) or index.overlap(t) >= near for t in texts], dtype=bool)
    raise ValueError(f"unknown copy kind {kind!r}; known: exact, near")


def copy_counts(texts: list[str], index: CopyIndex, near: float = NEAR) -> dict:
    """{"n", "exact", "near", "exact_share", "near_share"} of ``texts`` against ``index``."""
    exact, near_n = (int(copied(texts, index, kind, near).sum()) for kind in ("exact", "near"))
    n = len(texts)
    return {"n": n, "exact": exact, "near": near_n, "exact_share": exact / n if n else 0.0,
            "near_share": near_n / n if n else 0.0}


def memorisation_report(texts: list[str], train: CopyIndex, test: CopyIndex | None = None, near: float = NEAR) -> dict:
    """Copies of training texts (memorisation) and of test texts (contamination) among ``texts``."""
    out = {"ngram": train.n, "near_threshold": near, "train": copy_counts(texts, train, near)}
    if test is not None:
        out["test"] = copy_counts(texts, test, near)
    return out


__all__ = ["CopyIndex", "copied", "joined", "copy_counts", "memorisation_report", "ngrams", "normalise", "NGRAM",
           "NEAR"]
