"""Stage 3, selection: DPC texts per class among the generator's candidates, and the final sets of a run.

*Candidates* are the usable texts sampled for one class (empty and duplicate ones dropped): the run's generator's,
and with ``final_sources`` generator+lm (the default) also the LM stage's generator's: two draws (the second the
run's generator's, or the LM's again where the run's generator is the LM stage's), so as many candidates are drawn
with or without matching (:func:`final_candidates`). A :class:`Selection` says how DPC of them are kept
(:mod:`dilm.selection` has the algorithms):

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

import contextlib
import hashlib
import json
import random
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dilm import DilmError
from dilm.distill.checkpoint import RESUME_FREE, State, load_lm_checkpoint
from dilm.distill.config import DistillConfig
from dilm.distill.context import RunContext
from dilm.features import embed
from dilm.files import json_made_once
from dilm.generator import Sample
from dilm.memorisation import CopyIndex, copied, joined, memorisation_report
from dilm.models import inference_dtype
from dilm.seeds import derive_seed
from dilm.selection import both_generators, half_rows, label_filter, originals_first, select_rows, split_counts
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


def select_sets(ctx: RunContext, candidates: list[list[list[Sample]]], dpcs: list[int],
                seeds: list[int], firsts: list[list[int]] | None = None) -> dict[int, list[SynSet]]:
    """{dpc: one set per element of ``candidates`` (a set's per-class candidates)}, selected as the config says
    (``firsts``: per set and class, how many candidates are the first of two draws)."""
    how, firsts = Selection.of(ctx.cfg), firsts or [None] * len(candidates)
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


def final_counts(ctx: RunContext) -> tuple[list[int], list[str]]:
    """What the final sets sample: ``counts[i]`` candidates of class ``names[i]``: over_sample × (largest DPC) per
    class, for every set (``final_pool`` per_set) or once (shared)."""
    cfg, c = ctx.cfg, ctx.task.num_classes
    draws = 1 if cfg.final_pool == "shared" else cfg.n_sets
    return [cfg.over_sample * cfg.dpc[-1]] * (c * draws), list(ctx.task.label_names) * draws


LM_DRAW, GENERATOR_DRAW = "lm", "generator"  # the two halves of a generator+lm pool


def final_seed(cfg: DistillConfig, draw: str = LM_DRAW) -> int:
    """The seed of a final draw: the LM stage's (and the run's generator's with ``final_sources`` generator), or,
    with generator+lm, the run's generator's, another seed: the pool's halves are two draws even when the run's
    generator is the LM stage's."""
    if draw == GENERATOR_DRAW and cfg.final_sources == "generator+lm":
        return derive_seed(cfg.seed, "final candidates", GENERATOR_DRAW)
    return derive_seed(cfg.seed, "final candidates")


def lm_candidates_place(ctx: RunContext, counts: list[int], names: list[str], draw: str = LM_DRAW
                        ) -> tuple[Path | None, int]:
    """(where the LM stage's candidates of ``draw`` are kept, their sampling seed): the cache every run from the LM
    checkpoint shares (:meth:`RunContext.lm_only_cache_path`, ``candidates``; the key holds the weights and
    everything sampling reads), or the run's folder (:func:`in_run_lm_candidates_path`; None there for
    ``final_sources`` generator)."""
    cfg = ctx.cfg
    seed = final_seed(cfg, draw)
    fields = {"counts": counts, "names": names, "seed": seed, "generator": cfg.generator, "template": ctx.template,
              "limits": ctx.limits, "top_p": cfg.top_p, "batch": cfg.gen_batch_size, "sampler": cfg.sampler,
              "drop_unfinished": cfg.drop_unfinished, "is_pair": ctx.task.is_pair,
              "precision": str(inference_dtype(ctx.device))}
    return ctx.lm_only_cache_path("candidates", fields) or in_run_lm_candidates_path(cfg, fields), seed


def lm_candidates(ctx: RunContext, counts: list[int], names: list[str], generator_is_lm: bool = True,
                  draw: str = LM_DRAW) -> list[list[Sample]]:
    """The LM stage's generator's final candidates (of ``draw``: :func:`final_seed`), sampled once and kept where
    :func:`lm_candidates_place` says (without a place, sampled and not kept). Not on disk yet: sampled by the
    generator when ``generator_is_lm``, else with the LM checkpoint's weights swapped in for the call
    (:func:`lm_weights`); a run without an LM checkpoint whose generator has moved on has lost them, a one-line
    error."""
    cfg = ctx.cfg
    path, seed = lm_candidates_place(ctx, counts, names, draw)
    if path is None:
        return ctx.sample(counts, seed, names)

    def rows() -> list:
        if generator_is_lm:
            drawn = ctx.sample(counts, seed, names)
        elif cfg.lm_checkpoint:
            with lm_weights(ctx):
                drawn = ctx.sample(counts, seed, names)
        else:
            raise DilmError(f"the LM stage's candidates of this run are not on disk ({path}) and the generator has "
                            "moved on: run it again from the start, or set final_sources generator")
        return [[[s.text, s.text_pair, s.ids, s.prompt_len] for s in group] for group in drawn]

    return [[Sample(*row) for row in group] for group in json_made_once(path, rows)]


IN_RUN_LM_CANDIDATES = "lm_candidates-*.json"  # in a run's folder: its own LM stage's candidates (generator+lm)


def in_run_lm_candidates_path(cfg: DistillConfig, fields: dict) -> Path | None:
    """Where a run whose LM stage ran in it keeps that generator's candidates (``final_sources`` generator+lm): its
    folder, under the hash of what sampling reads and the config's fields a resumed run may not change (the LM's
    weights follow from them); None for ``final_sources`` generator."""
    if cfg.final_sources != "generator+lm":
        return None
    fixed = {k: v for k, v in cfg.to_dict().items() if k not in (*RESUME_FREE, "output_dir")}
    key = hashlib.sha256(json.dumps([fields, fixed], sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cfg.output_dir) / IN_RUN_LM_CANDIDATES.replace("*", key)


def keep_lm_candidates(ctx: RunContext, state: State) -> None:
    """Before matching, with ``final_sources`` generator+lm and the LM stage in this run (from an LM checkpoint they
    are read, or sampled later with its weights): sample the LM's candidates while the generator holds its weights,
    or, resuming after matching began, fail now (one line) if they are not on disk, not after the matching."""
    cfg = ctx.cfg
    if cfg.final_sources != "generator+lm" or not cfg.outer_loops or cfg.lm_checkpoint or state.stage != "match":
        return
    if state.outer == 0:
        lm_candidates(ctx, *final_counts(ctx))
        return
    path, _ = lm_candidates_place(ctx, *final_counts(ctx))
    if not path.exists():
        raise DilmError(f"this run resumes after matching began, and its LM stage's candidates are not in {path}: "
                        "resume it with final_sources generator, or start it afresh")


def forget_lm_candidates(cfg: DistillConfig) -> None:
    """A fresh LM stage: the LM candidates an earlier run left in this folder are not its generator's."""
    for old in Path(cfg.output_dir).glob(IN_RUN_LM_CANDIDATES):
        old.unlink()


@contextlib.contextmanager
def lm_weights(ctx: RunContext):
    """The LM checkpoint's weights in the run's generator for the ``with`` block, its own weights back after it."""
    own = {k: v.detach().to("cpu", copy=True) for k, v in ctx.generator.state_dict().items()}
    try:
        lm = load_lm_checkpoint(ctx.cfg.lm_checkpoint, ctx.cfg, ctx.task, ctx.template, "cpu")
        ctx.generator.load_state_dict(lm.state_dict())
        del lm
        yield
    finally:
        ctx.generator.load_state_dict(own)


def lm_only(cfg: DistillConfig, state: State) -> bool:
    """Whether the run's final generator is the LM stage's: no matching, or matching never validated above step 0."""
    return cfg.outer_loops == 0 or (state.best_step is not None and state.best_step == cfg.lm_steps)


def final_candidates(ctx: RunContext, state: State, counts: list[int], names: list[str]
                     ) -> tuple[list[list[Sample]], list[int] | None]:
    """The final sets' candidates (``counts[i]`` samples of class ``names[i]`` from each source, each source's in one
    sampling call: large batches; duplicates are removed within a set, not across sets) and, with two draws, how
    many of each row's are the first draw's (None with one draw). ``final_sources``
    generator: the run's generator's, which when it is the LM stage's are :func:`lm_candidates` (the vanilla-LM
    baseline of a sweep and its trials that kept the LM-only generator sample them once). generator+lm: the LM
    stage's candidates (read from disk where the vanilla baseline or matching's start left them), then the run's
    generator's, drawn with another seed (:func:`final_seed`), that are not among them (:func:`both_generators`).
    Where the run's generator is the LM stage's, that second draw is the LM's too (kept like the first): the pool
    has the same size whether or not matching was kept, so a matched run and the vanilla LM differ by matching
    alone, not by how many candidates the selection saw."""
    cfg = ctx.cfg
    lm_is_ours = lm_only(cfg, state)

    def ours() -> list[list[Sample]]:  # the run's generator's draw (final_sources generator: the LM's seed)
        if lm_is_ours:
            return lm_candidates(ctx, counts, names, draw=GENERATOR_DRAW)
        return ctx.sample(counts, final_seed(cfg, GENERATOR_DRAW), names)

    if cfg.final_sources == "generator":
        return ours(), None
    first = lm_candidates(ctx, counts, names, generator_is_lm=lm_is_ours)  # the LM's half is drawn first
    return both_generators(first, ours()), [len(row) for row in first]


def final_sets(ctx: RunContext, state: State) -> tuple[dict[int, list[Path]], dict[int, dict]]:
    """``n_sets`` sets per DPC → ({dpc: set paths}, {dpc: memorisation report}). ``final_pool`` per_set: every DPC of
    set k selects from set k's over_sample × (largest DPC) candidates per class (per generator, with
    ``final_sources`` generator+lm: :func:`final_candidates`), the candidates of all sets sampled together (large
    batches); shared: one pool of that size per class, and set k selects from its seeded random half
    (:func:`select_from_pool`). Label agreement of all candidates (``final_label_agreement``) and of each DPC's
    selected texts (``final_label_agreement/dpc<d>``) is emitted, and each DPC's copies of training and test texts
    (:func:`log_copies`)."""
    cfg = ctx.cfg
    c, seeds = ctx.task.num_classes, [derive_seed(cfg.seed, "final set", k) for k in range(cfg.n_sets)]
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
