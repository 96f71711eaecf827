"""Stage 2, matching: the generator learns to write texts whose weighted learner gradient matches real data's.

``outer_loops`` outer loops of ``inner_loop`` generator steps. Every outer loop re-initialises the learner and trains
it ``model_step_per_inner_step`` steps on real data between generator steps (none after the last). A generator step
compares, per class, the learner head's gradient on the next *representative set* (real examples nearest k-means
centroids) with its gradient on B = ``syn_per_class`` texts of the *pool*, weighted by softmax(−generation loss / T):
the weights carry the matching loss back to the generator (:mod:`dilm.matching`). The pool is sampled every
``generate_interval`` outer loops and clustered on the current learner's features; mini-batch ``slot`` takes member
``slot`` of every cluster. Validation at step 0 and every ``val_interval`` outer loops keeps the best generator.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from sklearn.cluster import KMeans
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from dilm import DilmError
from dilm.device import autocast
from dilm.distill.checkpoint import State, save_checkpoint
from dilm.distill.config import DistillConfig
from dilm.distill.context import RunContext
from dilm.distill.select import Selection, select_sets
from dilm.files import json_made_once
from dilm.generator import Sample, generation_loss, lm_loss, pad_samples
from dilm.matching import class_gradient, match_loss, matched_params, sample_weights
from dilm.models import packaged_identity
from dilm.protocol import PROTOCOL, linear_warmup_decay
from dilm.seeds import derive_seed
from dilm.selection import kmeans_nearest
from dilm.tasks import Example
from dilm.text import pad_ids

FAIL_AT_STEP: int | None = None  # a test hook, not a setting: raise at this matching step (tests set it)
Pool = tuple[list[Sample], list[list[int]], list[list[int]]]  # (samples, clusters of sample indices, learner ids)
Schedule = torch.optim.lr_scheduler.LambdaLR


def representative_sets(ctx: RunContext) -> list[list[list[Example]]]:
    """[class][set] → real examples: per class, ``n_rep_sets`` k-means runs (k = ``real_per_class``, seeds
    differ) over the whole class (or ``rep_pool_per_class`` of it) on the pre-trained learner's features, the
    example nearest each centroid."""
    cfg = ctx.cfg
    out = []
    for c in range(ctx.task.num_classes):
        group = [e for e in ctx.train if e.label == c]
        if cfg.rep_pool_per_class and len(group) > cfg.rep_pool_per_class:
            rng = random.Random(derive_seed(cfg.seed, "representative pool", c))
            group = rng.sample(group, cfg.rep_pool_per_class)
        k = min(cfg.real_per_class, len(group))
        feats = ctx.features(group)
        out.append([[group[i] for i in kmeans_nearest(feats, k, cfg.seed + r, n_init=1)]
                    for r in range(cfg.n_rep_sets)])
    return out


def regenerate_pool(ctx: RunContext, seed: int, learner) -> list[Pool]:
    """Per class: ``pool_size`` samples, their ``syn_per_class`` k-means clusters on ``learner``'s current
    features (lists of sample indices) and their learner token ids."""
    cfg = ctx.cfg
    pools = []
    sampled = ctx.sample([cfg.pool_size] * ctx.task.num_classes, seed)
    for name, samples in zip(ctx.task.label_names, sampled):
        if len(samples) < cfg.syn_per_class:
            raise DilmError(f"the generator produced only {len(samples)} usable texts for class {name!r} "
                            f"(need syn_per_class={cfg.syn_per_class}); train the LM longer")
        ids = ctx.learner_ids(samples)
        feats = ctx.learner_features(learner, ids)
        km = KMeans(n_clusters=cfg.syn_per_class, n_init=1, random_state=seed).fit(feats.double().numpy())
        clusters = [[i for i, lab in enumerate(km.labels_) if lab == j] for j in range(cfg.syn_per_class)]
        pools.append((samples, [cl for cl in clusters if cl], ids))
    return pools


def generator_step(ctx: RunContext, state: State, opt: torch.optim.Optimizer, sched: Schedule, learner,
                   rep_sets: list[list[dict]], pools: list[Pool], slot: int) -> dict:
    """One matching step over all classes; returns its metrics. The real batch is the next representative set
    (in order); the synthetic batch is member ``slot`` of every pool cluster (``slot`` counts the steps since
    the pool was generated, so members are used once each until a cluster runs out, then again from its
    start)."""
    cfg, gen_pad = ctx.cfg, ctx.gen_tok.pad_token_id
    learner.eval()  # gradients compared without dropout; the learner itself is only read
    params = matched_params(learner, cfg.all_layers)
    match_step = state.step - cfg.lm_steps
    c_n = ctx.task.num_classes
    total, sims = 0.0, []
    opt.zero_grad(set_to_none=True)
    for c in range(c_n):
        real = rep_sets[c][match_step % len(rep_sets[c])]  # pre-encoded learner inputs
        with torch.no_grad():  # a constant for the generator: no graph kept
            g_real = class_gradient(learner, params, real, c)
        samples, clusters, learner_ids = pools[c]
        picks = [cl[slot % len(cl)] for cl in clusters]
        ids, am, tm = pad_samples([samples[i] for i in picks], gen_pad, ctx.device)
        w = sample_weights(generation_loss(ctx.generator, ids, am, tm, ctx.device, cfg.gen_loss_norm),
                           cfg.temperature)  # (B,)
        syn = pad_ids([learner_ids[i] for i in picks], ctx.learn_tok.pad_token_id, ctx.device)
        g_syn = class_gradient(learner, params, syn, c, weights=w)
        loss = match_loss(g_real, g_syn) / c_n
        loss.backward()  # per class: frees this class's graph before the next
        total += loss.item()
        sims.append(1 - loss.item() * c_n)
    if cfg.lm_lambda:
        batch = ctx.corpus.batch(cfg.lm_batch_size, ctx.rng, ctx.device)  # the corpus is tokenised only if mixed
        mix = cfg.lm_lambda * lm_loss(ctx.generator, batch, ctx.device)
        mix.backward()
    torch.nn.utils.clip_grad_norm_(ctx.generator.parameters(), 1.0)
    opt.step()
    sched.step()
    return {"match_loss": total, "grad_sim": sum(sims) / len(sims), "lr": sched.get_last_lr()[0]}


def match_optimizer(ctx: RunContext) -> tuple[torch.optim.Optimizer, Schedule]:
    """The reference's matching stage: AdamW (``generator_lr``, ``generator_weight_decay``), cosine schedule
    with 5 % warm-up over all matching steps."""
    cfg = ctx.cfg
    opt = torch.optim.AdamW(ctx.generator.parameters(), lr=cfg.generator_lr, weight_decay=cfg.generator_weight_decay)
    return opt, get_cosine_schedule_with_warmup(opt, max(1, int(0.05 * cfg.total_match_steps)), cfg.total_match_steps)


def learner_optimizer(ctx: RunContext, learner) -> tuple[torch.optim.Optimizer, Schedule]:
    """The evaluation protocol's optimiser for the inner learner: AdamW (``learner_lr``, the protocol's weight
    decay), linear warm-up over the protocol's share then decay, over ``inner_loop × model_step_per_inner_step``
    steps (as the reference; the last inner step takes none, so the decay never quite reaches 0)."""
    cfg = ctx.cfg
    opt = torch.optim.AdamW(learner.parameters(), lr=cfg.learner_lr, weight_decay=PROTOCOL.weight_decay)
    total = cfg.inner_loop * cfg.model_step_per_inner_step
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_warmup_decay(s, total, PROTOCOL.warmup_ratio))


def inner_learner_steps(ctx: RunContext, learner, learner_opt: torch.optim.Optimizer, learner_sched: Schedule) -> None:
    """``model_step_per_inner_step`` steps on random real batches, in eval mode (no dropout), clipped."""
    learner.eval()
    train = ctx.train
    for _ in range(ctx.cfg.model_step_per_inner_step):
        idx = ctx.rng.sample(range(len(train)), min(ctx.cfg.learner_batch_size, len(train)))
        with autocast(ctx.device):
            logits = learner(**pad_ids(ctx.train_ids(idx), ctx.learn_tok.pad_token_id, ctx.device)).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor([train[i].label for i in idx],
                                                                              device=ctx.device))
        learner_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(learner.parameters(), PROTOCOL.clip)
        learner_opt.step()
        learner_sched.step()


@dataclass(frozen=True)
class ValidationSpec:
    """Every config field validation reads, resolved, besides the run's sampling (:attr:`RunContext.sampling`) and
    seed: :func:`validate` takes this object, not the config, and the key of the step-0 validation
    (:func:`step0_cache_path`) is derived from it."""

    dpc: int  # val_dpc: DPC of a validation set
    sets: int  # val_sets: sets per validation
    candidates: int  # candidates sampled per class and set: max(2, over_sample) × val_dpc
    learner: str  # trained on each set; its pre-trained body gives the selection's features
    seeds: int  # val_seeds: learners per set
    steps: int  # val_steps: protocol steps per learner
    val_size: int  # held-out training examples scored (the split follows from it, the seed and the data)
    probe: str  # the label filter's probe ('' = none)
    probe_examples: int
    selection: Selection  # how a set is chosen: one draw, so no final_mix split

    @classmethod
    def of(cls, cfg: DistillConfig) -> ValidationSpec:
        return cls(cfg.val_dpc, cfg.val_sets, max(2, cfg.over_sample) * cfg.val_dpc, cfg.learner, cfg.val_seeds,
                   cfg.val_steps, cfg.val_size, cfg.probe, cfg.probe_examples,
                   dataclasses.replace(Selection.of(cfg), split=False))


def validate(ctx: RunContext, spec: ValidationSpec, seed: int) -> float:
    """Accuracy (%) on the held-out split, mean over ``spec.sets`` freshly selected sets of ``spec.dpc`` ×
    ``spec.seeds`` learners trained by the protocol (``ctx.val_evaluator``, of the same learner, seeds and steps)."""
    t = time.perf_counter()
    names, c = ctx.task.label_names, ctx.task.num_classes
    cands = ctx.sample([spec.candidates] * (c * spec.sets), seed, list(names) * spec.sets)
    per_set = [cands[k * c: (k + 1) * c] for k in range(spec.sets)]
    sets = select_sets(ctx, per_set, [spec.dpc], [seed + k for k in range(spec.sets)], how=spec.selection)[spec.dpc]
    acc = ctx.val_evaluator.evaluate(sets).mean_accuracy()
    ctx.timings["val_s"] = ctx.timings.get("val_s", 0.0) + time.perf_counter() - t
    return acc


def step0_cache_path(ctx: RunContext, spec: ValidationSpec) -> Path | None:
    """Where the step-0 validation of this run is kept (:meth:`RunContext.lm_only_cache_path`, ``validation``): the
    generator at step 0 is the LM checkpoint's, so every trial of a sweep that differs only in matching keys
    validates the same generator the same way (seeds and all): the first computes it, the others read it. The key
    holds the packaged learner and probe, ``spec``, the run's sampling and seed (and, through the cache path, the
    weights and the data). None (always computed) without an LM checkpoint or with a model that is not packaged."""
    models = [packaged_identity(spec.learner), packaged_identity(spec.probe) if spec.probe else []]
    if None in models:
        return None
    return ctx.lm_only_cache_path("validation", {
        "models": models, "validation": dataclasses.asdict(spec), "sampling": dataclasses.asdict(ctx.sampling),
        "seed": ctx.cfg.seed})


def validate_step0(ctx: RunContext, spec: ValidationSpec) -> float:
    """:func:`validate` of the LM-only generator, read from / written to :func:`step0_cache_path` where it has one."""
    path = step0_cache_path(ctx, spec)
    if path is None:
        return validate(ctx, spec, ctx.cfg.seed)
    return json_made_once(path, lambda: validate(ctx, spec, ctx.cfg.seed))


def maybe_validate(ctx: RunContext, spec: ValidationSpec, state: State, best_state: dict | None,
                   seed: int) -> dict | None:
    """Validate at matching step 0 (the LM-only generator: :func:`validate_step0`) and every ``val_interval`` outer
    loops; returns the best generator's weights so far (so the kept generator is never worse on validation than the
    LM's)."""
    cfg = ctx.cfg
    if not cfg.val_interval or state.outer % cfg.val_interval:
        return best_state
    acc = validate_step0(ctx, spec) if state.outer == 0 else validate(ctx, spec, seed)
    if state.best_val is None or acc > state.best_val:
        state.best_val, state.best_step = acc, state.step
        best_state = {k: v.detach().to("cpu", copy=True) for k, v in ctx.generator.state_dict().items()}
    ctx.emit(state, stage="match", val_accuracy=acc, best_val_accuracy=state.best_val)
    return best_state


def match(ctx: RunContext, state: State, best_state: dict | None, opt_state: dict | None = None) -> dict | None:
    """Run (or resume, from ``state`` and the optimiser's ``opt_state``) the matching stage; returns the weights of
    the best-validated generator (None without validation, or when the generator already holds them). Checkpoints
    every ``checkpoint_interval`` outer loops; after the last, the generator holds the best-validated weights and
    the checkpoint keeps only them (a quarter of the bytes: no second copy, no optimiser moments)."""
    cfg = ctx.cfg
    if cfg.outer_loops == 0:  # the vanilla-LM ablation: no representative sets to build
        state.stage = "select"
        return best_state
    rep_sets = [[ctx.learner_inputs(s) for s in sets] for sets in representative_sets(ctx)]  # encoded once
    val = ValidationSpec.of(cfg)
    opt, sched = match_optimizer(ctx)
    if opt_state is not None:  # resume: AdamW moments and step counts as they were
        opt.load_state_dict(opt_state)
    for _ in range(state.outer * cfg.inner_loop):  # resume: the schedule continues where it stopped
        sched.step()
    if state.outer == 0:
        best_state = maybe_validate(ctx, val, state, best_state, cfg.seed)  # step 0: the LM-only generator
    pools, learner = None, None
    bar = tqdm(range(state.outer, cfg.outer_loops), desc="match", initial=state.outer, total=cfg.outer_loops)
    for outer in bar:
        born = outer - outer % cfg.generate_interval  # the outer loop this pool belongs to
        fresh = ctx.fresh_learner(seed=cfg.seed + outer)
        if pools is None or outer == born:
            # clustered on the learner as the last outer loop left it (the fresh one at the start / resume)
            pools = regenerate_pool(ctx, cfg.seed + born, learner or fresh)
            ctx.log_agreement(state, "label_agreement", [samples for samples, _, _ in pools])
        learner = fresh
        learner_opt, learner_sched = learner_optimizer(ctx, learner)
        for inner in range(cfg.inner_loop):
            if state.step - cfg.lm_steps == FAIL_AT_STEP:
                raise RuntimeError(f"injected failure at matching step {FAIL_AT_STEP}")
            slot = (outer - born) * cfg.inner_loop + inner
            metrics = generator_step(ctx, state, opt, sched, learner, rep_sets, pools, slot)
            state.step += 1
            ctx.emit(state, stage="match", **metrics)
            if inner < cfg.inner_loop - 1:  # none after the last generator step of the outer loop
                inner_learner_steps(ctx, learner, learner_opt, learner_sched)
        state.outer = outer + 1
        best_state = maybe_validate(ctx, val, state, best_state, cfg.seed + outer)
        if state.best_val is not None:
            bar.set_postfix(best_val=f"{state.best_val:.1f}")
        if state.outer == cfg.outer_loops and best_state is not None:  # the last: keep only what selection reads
            ctx.generator.load_state_dict(best_state)
            best_state = None
        if state.outer % cfg.checkpoint_interval == 0:  # the last one has no optimiser: no step follows it
            save_checkpoint(cfg, ctx.generator, state, best_state, opt if state.outer < cfg.outer_loops else None)
    state.stage = "select"
    return best_state
