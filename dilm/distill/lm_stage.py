"""Stage 1, the LM stage: label-conditioned fine-tuning of the generator on the training split.

Every training example is rendered as its class's prompt followed by the text (pairs: ``... \\npair: ...``) and EOS;
the generator learns them by next-token loss: AdamW (``lm_lr``, ``lm_weight_decay``), cosine schedule with 10 %
warm-up, clip 1 (the reference's). The stage reads the config only through :class:`LMStageConfig`, so every field it
reads is part of its cache key (:func:`lm_cache_key`); configs with equal keys share one LM-stage checkpoint
(:func:`train_lm`), whatever their matching and selection stages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

import dilm
from dilm.device import training_attention
from dilm.distill.checkpoint import State, lm_checkpoint_key, write_lm_checkpoint
from dilm.distill.config import DistillConfig
from dilm.distill.context import Callback, RunContext, split_train
from dilm.files import file_lock
from dilm.generator import TokenizedCorpus, lm_loss, resolve_template
from dilm.probe import task_fingerprint
from dilm.tasks import TaskData, load_task


@dataclass(frozen=True)
class LMStageConfig:
    """Every config field the LM stage reads, under the :class:`DistillConfig` names: the stage's code takes this
    object, not the whole config, so a field it reads is a field of its cache key (:func:`lm_cache_key`)."""

    generator: str
    lm_steps: int
    lm_lr: float
    lm_weight_decay: float
    lm_batch_size: int
    lm_precision: str
    max_length: int
    length_quantile: float
    length_cap: int
    seed: int

    @classmethod
    def of(cls, cfg: DistillConfig) -> LMStageConfig:
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


LM_KEYS = tuple(f.name for f in dataclasses.fields(LMStageConfig))  # the DistillConfig fields of the LM stage


def lm_cache_key(cfg: DistillConfig, task: TaskData | None = None) -> str:
    """Content key of the LM stage: its :class:`LMStageConfig`, the rendered prompt template and a hash of the
    training examples it sees. Configs with equal keys share one checkpoint; any other field (matching stage, DPC,
    …) does not enter it. Pass the loaded ``task`` to hash it without loading it again."""
    task = task or load_task(cfg.task)
    train, _ = split_train(cfg, task)
    payload = {**dataclasses.asdict(LMStageConfig.of(cfg)),
               "prompt": resolve_template(cfg.prompt_template, task.described_by), "labels": list(task.label_names),
               "data": task_fingerprint(train, task.label_names)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def lm_optimizer(lm: LMStageConfig, generator: torch.nn.Module,
                 device: torch.device) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The reference's LM stage: AdamW (``lm_lr``, ``lm_weight_decay``), cosine schedule with 10 % warm-up. The
    fused AdamW (one pass over the weights, on CPUs too) where torch has one for the device."""
    opt = torch.optim.AdamW(generator.parameters(), lr=lm.lm_lr, weight_decay=lm.lm_weight_decay,
                            fused=device.type in ("cpu", "cuda"))
    return opt, get_cosine_schedule_with_warmup(opt, int(0.1 * lm.lm_steps), lm.lm_steps)


def fine_tune(lm: LMStageConfig, generator: torch.nn.Module, corpus: TokenizedCorpus, rng: random.Random,
              device: torch.device, state: State, emit: Callable[..., None]) -> None:
    """Train ``generator`` from ``state.step`` to ``lm_steps`` on random batches of ``corpus`` (the training split
    rendered and cut at the LM stage's ``max_length``); ``emit(state, **metrics)`` every 10 steps and at the end."""
    opt, sched = lm_optimizer(lm, generator, device)
    for _ in range(state.step):
        sched.step()  # resume: the schedule continues where it stopped
    generator.train()
    with training_attention(generator, device, corpus.width):
        for step in tqdm(range(state.step, lm.lm_steps), desc="lm", initial=state.step, total=lm.lm_steps):
            loss = lm_loss(generator, corpus.batch(lm.lm_batch_size, rng, device), device, lm.lm_precision)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(generator.parameters(), 1.0)
            opt.step()
            sched.step()
            state.step = step + 1
            if step % 10 == 0 or state.step == lm.lm_steps:
                emit(state, stage="lm", lm_loss=loss.item(), lr=sched.get_last_lr()[0])
    state.stage = "match"


def train_lm(cfg: DistillConfig, out_dir: str | Path | None = None, task: TaskData | None = None,
             callback: Callback | None = None, key: str | None = None) -> Path:
    """Run only the LM stage; save the generator (an ordinary Hugging Face checkpoint, with its tokenizer and
    ``dilm_lm.json``) in ``out_dir`` (default ``<output_dir>/lm``), atomically. A folder already holding this
    config's :func:`lm_cache_key` is reused as it is; concurrent callers (a file lock) train it once.
    ``DistillConfig(lm_checkpoint=<the returned path>)`` then starts matching from it. A caller that has loaded the
    task and computed its key passes both (``task``, ``key``): nothing is loaded or hashed again."""
    task = task or load_task(cfg.task)
    out = Path(out_dir) if out_dir is not None else Path(cfg.output_dir) / "lm"
    key = key or lm_cache_key(cfg, task)
    if lm_checkpoint_key(out) == key:
        return out
    with file_lock(out.with_name(f".{out.name}.lock")):
        if lm_checkpoint_key(out) == key:  # trained by the caller that held the lock before us
            return out
        ctx = RunContext(dataclasses.replace(cfg, lm_checkpoint=""), callback, task)
        lm, state = LMStageConfig.of(cfg), State()
        t0 = time.perf_counter()
        fine_tune(lm, ctx.generator, ctx.corpus, ctx.rng, ctx.device, state, ctx.emit)
        last = [r["lm_loss"] for r in state.history if "lm_loss" in r]
        write_lm_checkpoint(out, ctx.generator, ctx.gen_tok, {
            "key": key, "generator": cfg.generator, "task": task.name, "label_names": list(task.label_names),
            "prompt_template": ctx.template, "config": dataclasses.asdict(lm), "train_examples": len(ctx.train),
            "final_lm_loss": last[-1] if last else None, "lm_s": time.perf_counter() - t0,
            "dilm_version": dilm.__version__, "git_revision": dilm.git_revision()})
    return out
