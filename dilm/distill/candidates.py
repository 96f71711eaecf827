"""Where the final sets' candidates come from: how many are drawn, with which seeds, by which generator, and where
the LM stage's are kept.

*Candidates* are the usable texts sampled for one class (empty and duplicate ones dropped): over_sample × (largest
DPC) per class (:func:`final_counts`), for every set (``final_pool`` per_set) or once (shared). With
``final_sources`` generator (the reference's) they are the run's generator's; with generator+lm (the default) also
the LM stage's generator's: two draws (the second the run's generator's, or the LM's again where the run's generator
is the LM stage's), each with its own seed (:func:`final_seed`), so as many candidates are drawn with or without
matching (:func:`final_candidates`).

The LM stage's draws are sampled once and kept (:func:`lm_candidates`): in the cache every run from the same LM
checkpoint shares, or, with the LM stage in the run, in the run's folder (sampled before matching moves the
generator: :func:`keep_lm_candidates`). Their key is derived from the run's :class:`~dilm.sampling.SamplingSpec`, the
counts, the seed and the LM's weights (their files, or the LM stage's own key), the data's hash with them; a run
from a checkpoint whose generator has moved on samples them with the checkpoint's weights swapped in
(:func:`lm_weights`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path

from dilm import DilmError
from dilm.distill.checkpoint import State, load_lm_checkpoint
from dilm.distill.config import DistillConfig
from dilm.distill.context import RunContext
from dilm.distill.lm_stage import lm_cache_key
from dilm.files import json_made_once
from dilm.generator import Sample
from dilm.seeds import derive_seed
from dilm.selection import both_generators


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
    checkpoint shares (:meth:`RunContext.lm_only_cache_path`, ``candidates``: its key holds the weights and the
    data), or the run's folder (:func:`in_run_lm_candidates_path`; None there for ``final_sources`` generator). Both
    keys hold what sampling reads (:attr:`RunContext.sampling`, whole), the counts and the seed."""
    seed = final_seed(ctx.cfg, draw)
    drawn = {"sampling": dataclasses.asdict(ctx.sampling), "counts": counts, "names": names, "seed": seed}
    return ctx.lm_only_cache_path("candidates", drawn) or in_run_lm_candidates_path(ctx, drawn), seed


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


def in_run_lm_candidates_path(ctx: RunContext, drawn: dict) -> Path | None:
    """Where a run whose LM stage ran in it keeps that generator's candidates (``final_sources`` generator+lm): its
    folder, under the hash of what was drawn (``drawn``: sampling, counts, seed) and the LM stage's key
    (:func:`~dilm.distill.lm_stage.lm_cache_key`: the LM's weights follow from it); None for ``final_sources``
    generator."""
    cfg = ctx.cfg
    if cfg.final_sources != "generator+lm":
        return None
    lm = lm_cache_key(cfg, ctx.task)
    key = hashlib.sha256(json.dumps([drawn, lm], sort_keys=True, default=str).encode()).hexdigest()[:16]
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
