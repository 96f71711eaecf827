"""Representative rows of a feature matrix: the real examples nearest the centroids of a k-means.

Shared by the coreset baseline ``kcenters`` (:mod:`dilm.coreset`), the matching stage's representative sets and the
selection of final sets from a synthetic pool (:mod:`dilm.distill`), and the real examples that start soft-label
learning with fewer examples than classes (:mod:`dilm.softlabel`).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.metrics.pairwise import euclidean_distances

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
