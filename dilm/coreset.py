"""Coreset baselines: exactly DPC real examples per class, chosen by ``random``, ``kcenters`` or ``herding``.

``kcenters`` follows the DiLM reference code: k-means (k = DPC, k-means++, seeded) on the class's learner
features, keeping the real example nearest each centroid — representative points, not the greedy
farthest-point k-center (which picks outliers). ``herding`` greedily keeps the running mean of the chosen
features closest to the class mean (iCaRL-style); it is deterministic, so it yields one set — unless ``halves``:
then set k (of ``n_sets``) is chosen from its own seeded random half of each class, for every method, so the
deterministic methods get a spread over the data they were given and an interval like the others.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dilm import DilmError
from dilm.device import pick_device
from dilm.features import POOLINGS, embed
from dilm.options import option
from dilm.seeds import derive_seed
from dilm.selection import herding, kmeans_nearest
from dilm.synset import SynSet
from dilm.tasks import Example, TaskData, check_dpc
from dilm.text import pair_args

METHODS = ("random", "kcenters", "herding")
FULL_SAMPLE = 2000  # the full-data reference trains the protocol on at most this many training examples


@dataclass(frozen=True)
class CoresetConfig:
    method: str = option("random", "how examples are chosen: random, kcenters or herding", choices=METHODS)
    dpc: tuple[int, ...] = option((5, 10, 20), "data per class, comma-separated: one group of sets each")
    n_sets: int = option(20, "sets per DPC (herding: always one)")
    learner: str = option("minilm-l6", "feature model of kcenters and herding")
    pooling: str = option("mean", "features: mean or cls of the last layer", choices=POOLINGS)
    candidates_per_class: int = option(2000, "kcenters and herding read the features of a seeded sample of each "
                                             "class this large (0 = the whole class)")
    seed: int = option(0, "seed of the random sets, samples and k-means")
    halves: bool = option(False, "set k chooses from its own seeded random half of each class (herding then gives "
                                 "n_sets sets too: an interval for every method)")
    device: str = option("auto", "auto, cpu or cuda[:N]")

    def __post_init__(self):
        if self.method not in METHODS:
            raise DilmError(f"unknown coreset method {self.method!r}; known: {', '.join(METHODS)}")
        if self.pooling not in POOLINGS:
            raise DilmError(f"unknown pooling {self.pooling!r}; known: {', '.join(POOLINGS)}")
        if not self.dpc or min(self.dpc) < 1 or self.n_sets < 1:
            raise DilmError("dpc values and n_sets must be >= 1")
        object.__setattr__(self, "dpc", tuple(sorted(self.dpc)))


def class_candidates(task: TaskData, cfg: CoresetConfig, half: int | None = None) -> list[list[Example]]:
    """Per class, what a set chooses from: the class (``half``: the seeded random half number ``half`` of it), then
    for kcenters and herding a seeded sample of ``candidates_per_class`` of that."""
    groups = task.by_class()
    if half is not None:
        groups = [random.Random(derive_seed(cfg.seed, "coreset half", half, c)).sample(g, max(1, len(g) // 2))
                  for c, g in enumerate(groups)]
    limit = cfg.candidates_per_class
    if not limit or cfg.method == "random":
        return groups
    seeds = [cfg.seed + c if half is None else derive_seed(cfg.seed, "coreset sample", half, c)
             for c in range(len(groups))]
    return [random.Random(s).sample(g, min(limit, len(g))) for s, g in zip(seeds, groups)]


def build_coresets(task: TaskData, cfg: CoresetConfig, device=None) -> dict[int, list[SynSet]]:
    """DPC → sets. Random and k-centers give ``n_sets`` seeded sets; herding gives one, or ``n_sets`` with
    ``halves`` (set k from half k). ``device``: where features are computed (default: ``cfg.device`` resolved)."""
    device = device or pick_device(cfg.device)
    for dpc in cfg.dpc:
        check_dpc(task, dpc)
    n_sets = 1 if cfg.method == "herding" and not cfg.halves else cfg.n_sets
    halves = list(range(n_sets)) if cfg.halves else [None]  # set k reads pools[k] with halves, else pools[None]
    pools = {h: class_candidates(task, cfg, h) for h in halves}
    feats = {h: None for h in halves}
    if cfg.method != "random":
        feats = {h: [embed(pair_args(g)[0], cfg.learner, device, cfg.pooling, pairs=pair_args(g)[1], cache=True)
                     for g in groups] for h, groups in pools.items()}
    out: dict[int, list[SynSet]] = {}
    for dpc in cfg.dpc:
        sets = []
        for k in range(n_sets):
            half = k if cfg.halves else None
            seed, groups, fk = cfg.seed + k, pools[half], feats[half]
            picked: list[Example] = []
            for c, g in enumerate(groups):
                if cfg.method == "random":
                    idx = random.Random(derive_seed(seed, "random coreset", c)).sample(range(len(g)), dpc)
                elif cfg.method == "kcenters":
                    idx = kmeans_nearest(fk[c], dpc, seed)
                else:
                    idx = herding(fk[c], dpc)
                picked += [g[i] for i in idx]
            sets.append(SynSet.from_examples(picked, task.label_names, method=cfg.method, dpc=dpc, seed=seed,
                                             learner=cfg.learner, pooling=cfg.pooling,
                                             **({} if half is None else {"half": half})))
        out[dpc] = sets
    return out


def full_data_set(task: TaskData, limit: int = FULL_SAMPLE, seed: int = 0) -> SynSet:
    """The full-data reference a set is measured against ("84 % of the full-data accuracy with 20 examples"): the
    whole training split, or for a larger one a seeded sample of about ``limit`` keeping the class proportions (the
    protocol's 200 steps of 64 see 12,800 examples: a 2,000-example sample is most of what it can use; the meta says
    how many of how many)."""
    train = task.train
    if limit and len(train) > limit:
        rng = random.Random(derive_seed(seed, "full data"))
        train = [e for g in task.by_class() for e in rng.sample(g, min(len(g), max(1, round(limit * len(g) /
                                                                                              len(task.train)))))]
    return SynSet.from_examples(train, task.label_names, method="full", seed=seed, sample_size=len(train),
                                train_examples=len(task.train))
