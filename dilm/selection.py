"""Choosing k rows of a feature matrix, and the label filter that runs before a choice among generated candidates.

Vocabulary: *candidates* are the generated texts of one class; *selection* keeps DPC of them.

* ``kmeans`` — the rows nearest the centroids of a k-means (the DiLM reference's "k-centers"): representative
  points. Shared by the coreset baseline ``kcenters`` (:mod:`dilm.coreset`), the matching stage's representative
  sets, the final sets, and the real examples that start soft-label learning with fewer examples than classes.
* ``herding`` — greedy herding: the running mean of the chosen rows is kept closest to a target mean, by default
  the candidates' own mean; ``herding-real`` aims at the mean of the class's *real* examples (distribution matching).
* the **label filter** (``probe``) keeps the candidates that a probe fitted on the real training split assigns to
  the class they were generated for (its most probable class, with probability ≥ a threshold); without it, the
  off-label texts a generator writes go into the sets. Too few survivors → the most confident fill up to k.
* the **copy filter** (``exact`` / ``near``, before the label filter) drops candidates that copy a training text
  (:mod:`dilm.memorisation`): a "synthetic" text that is a training text makes the set a coreset in disguise.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.metrics.pairwise import euclidean_distances

from dilm.seeds import derive_seed

if TYPE_CHECKING:
    from dilm.generator import Sample

SELECTIONS = ("kmeans", "herding", "herding-real")
FILTERS = ("none", "probe")
COPY_FILTERS = ("none", "exact", "near")  # which copies of training texts are dropped before selection
KMEANS_FULL_LIMIT = 2_000_000  # rows × clusters up to which full k-means is used; MiniBatchKMeans above


def kmeans_nearest(features: torch.Tensor, k: int, seed: int, n_init: int = 3) -> list[int]:
    """Indices of the rows nearest each of k k-means centroids (distinct rows).

    k-means++ (seeded); on large inputs (a whole SST-2 class with k = 200) scikit-learn's MiniBatchKMeans, which
    takes seconds where full k-means takes minutes on a few cores.
    """
    x = features.numpy().astype(np.float64)
    if len(x) * k <= KMEANS_FULL_LIMIT:
        km = KMeans(n_clusters=k, init="k-means++", n_init=n_init, random_state=seed).fit(x)
    else:
        km = MiniBatchKMeans(n_clusters=k, init="k-means++", n_init=n_init, random_state=seed,
                             batch_size=4096).fit(x)
    dist = euclidean_distances(x, km.cluster_centers_)  # (n, k)
    chosen: list[int] = []
    taken: set[int] = set()
    for j in range(k):
        for i in np.argsort(dist[:, j]):
            if int(i) not in taken:
                chosen.append(int(i))
                taken.add(int(i))
                break
    return chosen


def herding(features: torch.Tensor, k: int, target: torch.Tensor | None = None) -> list[int]:
    """Greedy herding on unit rows: step t keeps the row that brings the mean of the t chosen closest to ``target``
    (default: the mean of all rows; a (H,) mean of other data, e.g. the class's real examples, is unit-normalised
    feature space too). Deterministic; k distinct rows."""
    x = torch.nn.functional.normalize(features.double(), dim=1)  # (N, H)
    mu = x.mean(0) if target is None else target.double().to(x.device)  # (H,)
    total = torch.zeros_like(mu)
    chosen: list[int] = []
    for t in range(1, k + 1):
        dist = ((mu - (total[None] + x) / t) ** 2).sum(1)  # (N,) distance of each candidate mean to the target
        if chosen:
            dist[chosen] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        total += x[i]
    return chosen


def label_filter(probs: np.ndarray, label: int, threshold: float, k: int) -> list[int]:
    """Indices (in order) of the candidates the probe assigns to ``label`` — its most probable class (rows of
    ``probs`` (N, C)) — with probability ≥ ``threshold``; when fewer than ``k`` pass, the ``k`` with the highest
    probability of ``label`` instead (so selection can run)."""
    p = probs[:, label]
    keep = np.flatnonzero((probs.argmax(1) == label) & (p >= threshold))
    if len(keep) >= k:
        return keep.tolist()
    return sorted(np.argsort(-p, kind="stable")[:k].tolist())


def originals_first(copied: np.ndarray, k: int) -> list[int]:
    """Indices (in order) of the candidates that are not copies (``copied``: (N,) bool); when fewer than ``k`` are
    left, the first copies fill up to ``k`` (so selection can run; the copies report shows them)."""
    keep = np.flatnonzero(~copied)
    if len(keep) >= k:
        return keep.tolist()
    return sorted(keep.tolist() + np.flatnonzero(copied)[: k - len(keep)].tolist())


def select_rows(features: torch.Tensor, k: int, method: str, seed: int,
                real_mean: torch.Tensor | None = None) -> list[int]:
    """k rows of ``features`` by ``method`` (one of :data:`SELECTIONS`); ``herding-real`` needs ``real_mean``."""
    if method == "kmeans":
        return kmeans_nearest(features, k, seed)
    if method == "herding":
        return herding(features, k)
    if method == "herding-real":
        if real_mean is None:
            raise ValueError("herding-real needs the real class mean")
        return herding(features, k, real_mean)
    raise ValueError(f"unknown selection {method!r}; known: {', '.join(SELECTIONS)}")


def split_counts(sizes: list[int], dpc: int) -> list[int]:
    """How many of ``dpc`` each group of candidates gives: all from one group; from two, ``dpc``//2 from the first
    and the rest from the second, a group with too few giving what it lacks to the other."""
    if len(sizes) == 1:
        return [dpc]
    first = max(min(dpc // 2, sizes[0]), dpc - sizes[1])
    return [first, dpc - first]


def half_rows(sizes: list[int], least: int, seed: int) -> list[list[int]]:
    """Per class, a seeded random half (at least ``least``, at most all) of its ``sizes[c]`` candidates, in order."""
    return [sorted(random.Random(derive_seed(seed, "half", c)).sample(range(n), min(n, max(least, n // 2))))
            for c, n in enumerate(sizes)]


def both_generators(lm: list[list[Sample]], matched: list[list[Sample]]) -> list[list[Sample]]:
    """Per class, the LM stage's candidates followed by the matched generator's that are not among them."""
    out = []
    for first, then in zip(lm, matched):
        seen = {(s.text, s.text_pair) for s in first}
        out.append(first + [s for s in then if (s.text, s.text_pair) not in seen])
    return out
