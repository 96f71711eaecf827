"""Stage 3, selection: DPC texts per class among the generator's candidates, and the final sets of a run.

*Candidates* are the usable texts sampled for one class (empty and duplicate ones dropped); :func:`select` keeps DPC
of them per class, the candidates nearest the centroids of a k-means of their features (the reference's
"k-centers"). Validation (:mod:`dilm.distill.match_stage`) selects its sets the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from dilm import DilmError
from dilm.distill.checkpoint import State
from dilm.distill.context import RunContext
from dilm.generator import Sample
from dilm.seeds import derive_seed
from dilm.selection import kmeans_nearest
from dilm.synset import SynExample, SynSet, write_set


def check_candidates(candidates: list[list[Sample]], dpc: int, label_names) -> None:
    """Fail with one line when a class has fewer than ``dpc`` candidates."""
    for name, cand in zip(label_names, candidates):
        if len(cand) < dpc:
            raise DilmError(f"only {len(cand)} usable candidates for class {name!r}, DPC {dpc} needs more; "
                            "train the generator longer or raise max_new_tokens / length_cap")


def candidate_features(ctx: RunContext, candidates: list[list[Sample]], dpc: int) -> list[torch.Tensor]:
    """Per class, the (N_c, H) features of its candidates (the pre-trained learner's, ``pooling``), after checking
    there are at least ``dpc`` of them."""
    check_candidates(candidates, dpc, ctx.task.label_names)
    return [ctx.features(cand) for cand in candidates]


def select(candidates: list[list[Sample]], features: list[torch.Tensor], dpc: int, seed: int,
           label_names) -> SynSet:
    """DPC per class: k-means nearest-centroid among each class's candidates (``features[c]``: (N_c, H))."""
    check_candidates(candidates, dpc, label_names)
    picked: list[SynExample] = []
    for c, (cand, feats) in enumerate(zip(candidates, features)):
        picked += [SynExample(cand[i].text, c, cand[i].text_pair) for i in kmeans_nearest(feats, dpc, seed)]
    return SynSet(picked, label_names, {"dpc": dpc, "seed": seed})


def final_sets(ctx: RunContext, state: State) -> dict[int, list[Path]]:
    """``n_sets`` sets per DPC; every DPC of set k selects from set k's over_sample × (largest DPC)
    candidates; the candidates of all sets are sampled together (large batches). Label agreement of all
    candidates (``final_label_agreement``) and of each DPC's selected texts (``final_label_agreement/dpc<d>``)
    is emitted."""
    cfg, names = ctx.cfg, ctx.task.label_names
    out: dict[int, list[Path]] = {d: [] for d in cfg.dpc}
    per_set = cfg.over_sample * cfg.dpc[-1]
    c = ctx.task.num_classes
    # one sampling call for every (set, class): duplicates are removed within a set, not across sets
    pooled = ctx.sample([per_set] * (c * cfg.n_sets), derive_seed(cfg.seed, "final candidates"),
                        list(names) * cfg.n_sets)
    picked: dict[int, list[list[SynExample]]] = {d: [[] for _ in range(c)] for d in cfg.dpc}  # [dpc][class]
    for k in tqdm(range(cfg.n_sets), desc="select"):
        cands = pooled[k * c: (k + 1) * c]
        feats = candidate_features(ctx, cands, cfg.dpc[-1])  # computed once, shared by every DPC of set k
        for d in cfg.dpc:
            synset = select(cands, feats, d, derive_seed(cfg.seed, "final set", k), names)
            out[d].append(write_set(Path(cfg.output_dir) / "sets" / f"dpc{d}" / f"set{k:02d}.jsonl", synset))
            for e in synset.examples:
                picked[d][e.label].append(e)
    ctx.log_agreement(state, "final_label_agreement", [sum(pooled[i::c], []) for i in range(c)])
    for d in cfg.dpc:
        ctx.log_agreement(state, f"final_label_agreement/dpc{d}", picked[d])
    return out
