"""Stage 3, selection: DPC texts per class among candidates, and the final sets of a run.

*Candidates* are the usable texts sampled for one class; where the final sets' come from (the run's generator, the
LM stage's, how many, which seeds) is :mod:`dilm.distill.candidates`. A :class:`Selection` says how DPC of them are
kept (:mod:`dilm.selection` has the algorithms):

1. the **copy filter** (``copy_filter``): ``none``, ``exact`` or ``near`` — drop the candidates that copy a training
   text (:mod:`dilm.memorisation`; too few originals → copies fill up to DPC);
2. the **label filter** (``label_filter``): ``none``, or ``probe`` — keep the candidates the task's probe assigns
   to their class (probability ≥ ``filter_threshold``);
3. the **choice** (``selection``) among the survivors, on the pre-trained learner's features (``select_pooling``):
   ``kmeans`` (nearest the k-means centroids: the reference's "k-centers"), ``herding`` (toward the candidates'
   mean) or ``herding-real`` (toward the mean of the class's real training examples).

With two draws, ``final_mix`` split (the default) runs these steps on each draw alone, for DPC//2 per class of the
LM stage's draw and the rest of the run's generator's (a draw with too few candidates gives its share to the other);
pooled runs them over both together.

Validation (:mod:`dilm.distill.match_stage`) selects its sets the same way. The final sets come with the report of
their copies of training and test texts (:mod:`dilm.memorisation`), emitted as ``copies/<split>_<kind>/dpc<d>`` (%).
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dilm import DilmError
from dilm.distill.candidates import final_candidates, final_counts
from dilm.distill.checkpoint import State
from dilm.distill.config import DistillConfig
from dilm.distill.context import RunContext
from dilm.features import embed
from dilm.generator import Sample
from dilm.memorisation import CopyIndex, copied, joined, memorisation_report
from dilm.seeds import derive_seed
from dilm.selection import half_rows, label_filter, originals_first, select_rows, split_counts
from dilm.synset import SynExample, SynSet, write_set
from dilm.text import pair_args

REAL_MEAN_EXAMPLES = 1000  # real examples per class whose feature mean herding-real aims at (a seeded sample)


@dataclass(frozen=True)
class Selection:
    """How DPC per class are kept among candidates (the config's ``selection``, ``label_filter``,
    ``filter_threshold``, ``select_pooling`` and ``copy_filter``)."""

    method: str = "herding"
    label_filter: str = "probe"
    threshold: float = 0.0
    pooling: str = "mean"
    copy_filter: str = "none"
    split: bool = False  # candidates of two draws (Candidates.sources): DPC//2 from the first, the rest the second's

    @classmethod
    def of(cls, cfg: DistillConfig) -> Selection:
        return cls(cfg.selection, cfg.label_filter, cfg.filter_threshold, cfg.select_pooling, cfg.copy_filter,
                   cfg.final_mix == "split")


@dataclass
class Candidates:
    """One set's candidates and what selection reads of them, computed once and shared by every DPC."""

    samples: list[list[Sample]]  # [class] → its candidates
    features: list[torch.Tensor]  # [class] → (N_c, H) learner features (the selection's pooling)
    probs: list[np.ndarray] | None  # [class] → (N_c, C) the probe's probabilities, when the filter reads them
    copies: list[np.ndarray] | None = None  # [class] → (N_c,) bool: copies of a training text, when filtered
    sources: list[np.ndarray] | None = None  # [class] → (N_c,) int: 0 the first draw's, 1 the second's (two draws)


def check_candidates(candidates: list[list[Sample]], dpc: int, label_names) -> None:
    """Fail with one line when a class has fewer than ``dpc`` candidates."""
    for name, cand in zip(label_names, candidates):
        if len(cand) < dpc:
            raise DilmError(f"only {len(cand)} usable candidates for class {name!r}, DPC {dpc} needs more; "
                            "train the generator longer or raise max_new_tokens / length_cap")


def selection_features(ctx: RunContext, items, pooling: str, cache: bool = False) -> torch.Tensor:
    """(N, H) features of examples or samples under the pre-trained learner's body, pooled by ``pooling``
    (``cache``: real examples, kept on disk by :func:`dilm.features.embed`)."""
    texts, pairs = pair_args(items)
    return embed(texts, ctx.cfg.learner, ctx.device, pooling, model=ctx.feature_model, pairs=pairs, cache=cache)


def prepare(ctx: RunContext, candidates: list[list[Sample]], how: Selection, dpc: int,
            firsts: list[int] | None = None) -> Candidates:
    """Features (and probe probabilities, and copy flags) of one set's candidates, after checking there are ``dpc``
    per class; ``firsts[c]``: how many of class c's candidates (the first ones) are the first of two draws."""
    check_candidates(candidates, dpc, ctx.task.label_names)
    probs = None
    if how.label_filter == "probe":
        if ctx.probe is None:
            raise DilmError("label_filter probe needs a probe (set probe, e.g. minilm-l6)")
        probs = [ctx.probe.probabilities(cand, ctx.task.num_classes) for cand in candidates]
    copies = None
    if how.copy_filter != "none":
        copies = [copied([joined(s) for s in cand], ctx.copy_index, how.copy_filter) for cand in candidates]
    sources = None if firsts is None else [(np.arange(len(cand)) >= n).astype(int)
                                           for cand, n in zip(candidates, firsts)]
    return Candidates(candidates, [selection_features(ctx, cand, how.pooling) for cand in candidates], probs, copies,
                      sources)


_REAL_MEANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # run → {pooling: its class means}


def real_means(ctx: RunContext, pooling: str) -> list[torch.Tensor]:
    """Per class, the mean unit feature (H,) of a seeded sample of its real training examples (computed once per
    run and pooling, and let go with the run)."""
    known = _REAL_MEANS.setdefault(ctx, {})
    if pooling not in known:
        means = []
        for c in range(ctx.task.num_classes):
            group = [e for e in ctx.train if e.label == c]
            group = random.Random(derive_seed(ctx.cfg.seed, "real mean", c)).sample(
                group, min(REAL_MEAN_EXAMPLES, len(group)))
            feats = selection_features(ctx, group, pooling, cache=True).double()
            means.append(torch.nn.functional.normalize(feats, dim=1).mean(0))
        known[pooling] = means
    return list(known[pooling])


def select(cands: Candidates, dpc: int, seed: int, label_names, how: Selection,
           means: list[torch.Tensor] | None = None) -> SynSet:
    """DPC per class: the copy filter, the label filter, then ``how.method`` among the survivors; ``means`` for
    herding-real. With ``how.split`` and two draws (``cands.sources``), each draw's candidates on their own:
    :func:`split_counts` says how many of each."""
    check_candidates(cands.samples, dpc, label_names)
    picked: list[SynExample] = []
    for c, cand in enumerate(cands.samples):
        groups = [np.arange(len(cand))]
        if how.split and cands.sources is not None:
            groups = [np.flatnonzero(cands.sources[c] == s) for s in (0, 1)]
        for rows, k in zip(groups, split_counts([len(g) for g in groups], dpc)):
            if k:
                picked += [SynExample(cand[i].text, c, cand[i].text_pair)
                           for i in rows[choose_rows(cands, c, rows, k, seed, how, means)]]
    return SynSet(picked, label_names, {"dpc": dpc, "seed": seed, "selection": how.method,
                                        "label_filter": how.label_filter, "copy_filter": how.copy_filter,
                                        **({"final_mix": "split"} if how.split and cands.sources is not None else {})})


def choose_rows(cands: Candidates, c: int, rows: np.ndarray, k: int, seed: int, how: Selection,
                means: list[torch.Tensor] | None) -> list[int]:
    """``k`` positions in ``rows`` (class c's candidates to choose among): the copy filter, the label filter, then
    ``how.method`` among the survivors."""
    keep = list(range(len(rows)))
    if how.copy_filter != "none":
        if cands.copies is None:
            raise ValueError("the copy filter needs the candidates' copy flags (prepare them with it)")
        keep = originals_first(cands.copies[c][rows], k)
    if how.label_filter == "probe":
        if cands.probs is None:
            raise ValueError("the probe filter needs the candidates' probabilities (prepare them with it)")
        keep = [keep[i] for i in label_filter(cands.probs[c][rows][keep], c, how.threshold, k)]
    chosen = select_rows(cands.features[c][rows][keep], k, how.method, seed, None if means is None else means[c])
    return [keep[i] for i in chosen]


def subset(cands: Candidates, rows: list[list[int]]) -> Candidates:
    """The candidates ``rows[c]`` of each class c, with their features, probabilities and copy flags."""
    def take(per_class):
        return None if per_class is None else [x[r] for x, r in zip(per_class, rows)]
    return Candidates([[cand[i] for i in r] for cand, r in zip(cands.samples, rows)],
                      [f[r] for f, r in zip(cands.features, rows)], take(cands.probs), take(cands.copies),
                      take(cands.sources))


def select_sets(ctx: RunContext, candidates: list[list[list[Sample]]], dpcs: list[int], seeds: list[int],
                firsts: list[list[int]] | None = None, how: Selection | None = None) -> dict[int, list[SynSet]]:
    """{dpc: one set per element of ``candidates`` (a set's per-class candidates)}, selected as ``how`` (default:
    the config's :class:`Selection`) says (``firsts``: per set and class, how many candidates are the first of two
    draws)."""
    how, firsts = how or Selection.of(ctx.cfg), firsts or [None] * len(candidates)
    return choose(ctx, how, (prepare(ctx, cands, how, max(dpcs), n) for cands, n in zip(candidates, firsts)), dpcs,
                  seeds)


def select_from_pool(ctx: RunContext, pool: list[list[Sample]], dpcs: list[int],
                     seeds: list[int], firsts: list[int] | None = None) -> dict[int, list[SynSet]]:
    """{dpc: one set per seed}, each selected from the seed's random half of the one shared ``pool`` (per class
    candidates, prepared once: features, probe and copy flags are computed for the pool, not per set; ``firsts``:
    per class, how many are the first of two draws)."""
    how = Selection.of(ctx.cfg)
    prepared, sizes = prepare(ctx, pool, how, max(dpcs), firsts), [len(cand) for cand in pool]
    return choose(ctx, how, (subset(prepared, half_rows(sizes, max(dpcs), seed)) for seed in seeds), dpcs, seeds)


def choose(ctx: RunContext, how: Selection, prepared: Iterable[Candidates], dpcs: list[int],
           seeds: list[int]) -> dict[int, list[SynSet]]:
    """{dpc: one set per (prepared candidates, seed) pair}: every DPC selects from the same candidates."""
    means = real_means(ctx, how.pooling) if how.method == "herding-real" else None
    out: dict[int, list[SynSet]] = {d: [] for d in dpcs}
    for cands, seed in tqdm(zip(prepared, seeds), total=len(seeds), desc="select", disable=len(seeds) < 2):
        for d in dpcs:
            out[d].append(select(cands, d, seed, ctx.task.label_names, how, means))
    return out


def log_copies(ctx: RunContext, state: State, sets: dict[int, list[SynSet]]) -> dict:
    """The memorisation report of each DPC's sets (all of them together), emitted in % and returned."""
    train, test = ctx.copy_index, CopyIndex(joined(e) for e in ctx.task.test)
    reports = {}
    for d, got in sets.items():
        texts = [joined(e) for s in got for e in s.examples]
        reports[d] = report = memorisation_report(texts, train, test)
        ctx.emit(state, stage=state.stage, **{f"copies/{split}_{kind}/dpc{d}": 100 * report[split][f"{kind}_share"]
                                              for split in ("train", "test") for kind in ("exact", "near")})
    return reports


def final_set_seeds(cfg: DistillConfig) -> list[int]:
    """Final set k's seed: its selection's, and that of its half of a shared pool."""
    return [derive_seed(cfg.seed, "final set", k) for k in range(cfg.n_sets)]


def final_sets(ctx: RunContext, state: State) -> tuple[dict[int, list[Path]], dict[int, dict]]:
    """``n_sets`` sets per DPC → ({dpc: set paths}, {dpc: memorisation report}). ``final_pool`` per_set: every DPC of
    set k selects from set k's over_sample × (largest DPC) candidates per class (per generator, with
    ``final_sources`` generator+lm: :func:`final_candidates`), the candidates of all sets sampled together (large
    batches); shared: one pool of that size per class, and set k selects from its seeded random half
    (:func:`select_from_pool`). Label agreement of all candidates (``final_label_agreement``) and of each DPC's
    selected texts (``final_label_agreement/dpc<d>``) is emitted, and each DPC's copies of training and test texts
    (:func:`log_copies`)."""
    cfg = ctx.cfg
    c, seeds = ctx.task.num_classes, final_set_seeds(cfg)
    pooled, firsts = final_candidates(ctx, state, *final_counts(ctx))
    if cfg.final_pool == "shared":
        sets = select_from_pool(ctx, pooled, list(cfg.dpc), seeds, firsts)
    else:
        per_set = range(cfg.n_sets)
        sets = select_sets(ctx, [pooled[k * c: (k + 1) * c] for k in per_set], list(cfg.dpc), seeds,
                           None if firsts is None else [firsts[k * c: (k + 1) * c] for k in per_set])
    out = {d: [write_set(Path(cfg.output_dir) / "sets" / f"dpc{d}" / f"set{k:02d}.jsonl", s)
               for k, s in enumerate(got)] for d, got in sets.items()}
    ctx.log_agreement(state, "final_label_agreement", [sum(pooled[i::c], []) for i in range(c)])
    for d, got in sets.items():
        ctx.log_agreement(state, f"final_label_agreement/dpc{d}",
                          [[e for s in got for e in s.examples if e.label == i] for i in range(c)])
    return out, log_copies(ctx, state, sets)
