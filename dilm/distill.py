"""DiLM distillation: fine-tune a generator LM, match gradients through its generation probabilities, select.

Stages (``distill``): ``lm`` (label-conditioned fine-tuning) → ``match`` (``outer_loops`` × ``inner_loop`` generator
steps; the learner re-initialised every outer loop and trained ``model_step_per_inner_step`` steps on real data
between generator steps; the synthetic pool regenerated every ``generate_interval`` outer loops) → ``select``
(``over_sample`` × DPC candidates per class, k-means nearest-centroid on learner features, ``n_sets`` sets).
``outer_loops = 0`` is the "vanilla LM" ablation (steps 1 + 6 only).

Long because one run's config (keys, validation, presets: some 170 lines) sits beside the stages that
share its state (models, pools, checkpoints); moving ``DistillConfig`` and ``PRESETS`` to their own module is the
next split.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sklearn.cluster import KMeans
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

import dilm
from dilm import DilmError
from dilm.evaluate import Evaluator
from dilm.features import POOLINGS, embed, pool
from dilm.files import atomic_write_dir, write_json
from dilm.generator import (
    GEN_LOSS_NORMS,
    Sample,
    TokenizedCorpus,
    generation_loss,
    lm_loss,
    make_sampler,
    pad_samples,
    prompt,
    resolve_template,
    sample_classes,
)
from dilm.matching import class_gradient, match_loss, matched_params, sample_weights
from dilm.models import _file_lock as file_lock
from dilm.models import autocast, load_model, load_tokenizer, pick_device, resolve_model
from dilm.options import option
from dilm.probe import LabelProbe, task_fingerprint
from dilm.protocol import PROTOCOL, EvalConfig, linear_warmup_decay
from dilm.sampling import Sampler
from dilm.seeds import derive_seed
from dilm.selection import kmeans_nearest
from dilm.synset import SynExample, SynSet, write_set
from dilm.tasks import TASKS, Example, TaskData, check_dpc, length_limit, load_task
from dilm.text import encode, pad_ids, pair_args, tokenize

SAMPLER_MODES = ("dynamic", "static", "compiled")
LEARNER_MAX_LEN = PROTOCOL.max_length  # learner tokens per text in the matching stage: the evaluation's


@dataclass(frozen=True)
class DistillConfig:
    task: str = option("sst2", "packaged task name or hf:DATASET")
    generator: str = option("smollm2-135m", "causal LM to fine-tune (registry name, HF id or path)")
    learner: str = option("minilm-l6", "encoder classifier whose gradients are matched")
    dpc: tuple[int, ...] = option((5, 10, 20), "data per class of the final sets")
    n_sets: int = option(10, "final sets written per DPC (different seeds)")
    output_dir: str = option("runs/distill", "where sets, provenance and checkpoints go")
    seed: int = option(0, "seed of the run: data split, LM batches, pools, learners and selection derive from it")
    device: str = option("auto", "auto, cpu or cuda[:N]")
    prompt_template: str = option("task", "generator prompt: task (the packaged task's plain-words template; the bare "
                                          "label format for other tasks), label (label: <name>\\ntext:), or a "
                                          "template with a {label} field")
    probe: str = option("minilm-l6", "encoder of the label-agreement probe, fitted on the training split ('' = off)")
    probe_examples: int = option(4000, "training examples the probe is fitted on (a seeded sample; 0 = all)")
    # stage 1: label-conditioned LM fine-tuning
    lm_checkpoint: str = option("", "start matching from this LM-stage checkpoint (OUTPUT/lm of a run with "
                                    "--lm-only, written by train_lm); the LM stage is skipped")
    lm_steps: int = option(2000, "generator LM fine-tuning steps")
    lm_lr: float = option(1e-4, "AdamW lr of the LM stage (cosine schedule, warm-up 10%)")
    lm_weight_decay: float = option(0.01, "AdamW weight decay of the LM stage")
    lm_batch_size: int = option(64, "sequences per LM step")
    max_length: int = option(0, "LM-stage tokens per rendered training example (prompt and EOS included); 0 = from "
                                "the task's data: the length_quantile of the rendered lengths, at most length_cap")
    # stage 2: gradient matching
    outer_loops: int = option(50, "learner re-initialisations; 0 = vanilla LM ablation")
    inner_loop: int = option(10, "generator steps per outer loop")
    model_step_per_inner_step: int = option(20, "learner steps on real data between generator steps")
    generator_lr: float = option(3e-6, "AdamW lr of the matching stage (cosine, warm-up 5%)")
    generator_weight_decay: float = option(0.01, "AdamW weight decay of the matching stage")
    syn_per_class: int = option(64, "synthetic texts per class per matching step (B)")
    real_per_class: int = option(200, "real texts per class per representative set")
    n_rep_sets: int = option(10, "representative real sets per class, used in order")
    rep_pool_per_class: int = option(0, "real examples per class clustered into the representative sets; 0 = the "
                                        "whole class (the reference's)")
    pool_per_class: int = option(0, "synthetic pool per class; 0 = syn_per_class x inner_loop x generate_interval "
                                    "(the reference's: each pool text used about once)")
    pooling: str = option("cls", "learner features for every k-means (representative sets, pool clusters, final "
                                 "selection): cls (last-layer first token, the reference's) or mean",
                                 choices=POOLINGS)
    generate_interval: int = option(10, "regenerate the pool every this many outer loops")
    temperature: float = option(1.0, "T in w = softmax(-loss/T)")
    gen_loss_norm: str = option("batch", "generation loss per text: batch (sum of token NLLs / the batch's longest "
                                         "text, the reference's) or text (per-text mean NLL)",
                                         choices=GEN_LOSS_NORMS)
    lm_lambda: float = option(0.0, "weight of the LM loss mixed into the matching loss")
    all_layers: bool = option(False, "match gradients of all learner layers, not just the head")
    learner_lr: float = option(1e-4, "inner-loop learner lr (AdamW, the evaluation protocol's weight decay, warm-up "
                                     "and clipping)")
    learner_batch_size: int = option(64, "real examples per inner-loop learner step")
    val_interval: int = option(10, "validate at the start and every this many outer loops (0 = never)")
    val_size: int = option(500, "held-out training examples for validation")
    val_dpc: int = option(10, "DPC of the validation sets")
    val_sets: int = option(3, "validation sets per validation")
    val_seeds: int = option(3, "learner seeds per validation set")
    val_steps: int = option(200, "learner steps per validation evaluation (the protocol's 200)")
    # stage 3: final sets
    over_sample: int = option(20, "candidates per class = over_sample x DPC")
    max_new_tokens: int = option(0, "sampling limit in new tokens; 0 = from the task's data: the length_quantile of "
                                    "the training texts' token lengths (pair marker and EOS included), at most "
                                    "length_cap")
    length_quantile: float = option(0.99, "quantile of the data's token lengths that sets max_length / max_new_tokens")
    length_cap: int = option(512, "upper bound on the data-derived max_length and max_new_tokens")
    top_p: float = option(0.95, "nucleus sampling: smallest set of top tokens whose probability reaches top_p")
    drop_unfinished: bool = option(False, "drop samples that hit max_new_tokens without EOS (the reference keeps them)")
    gen_batch_size: int = option(256, "rows sampled together (all classes share a batch)")
    sampler: str = option("dynamic", "decode loop: dynamic (KV cache grows), static (pre-allocated KV cache) or "
                                     "compiled (static + torch.compile, a CUDA graph on GPUs)",
                                     choices=SAMPLER_MODES)
    checkpoint_interval: int = option(1, "checkpoint every this many outer loops")
    fail_at_step: int = option(-1, "testing aid: raise at this matching step (-1 = never)")

    def __post_init__(self):
        object.__setattr__(self, "dpc", tuple(sorted(int(d) for d in self.dpc)))
        if self.task not in TASKS and not self.task.startswith("hf:"):
            raise DilmError(f"unknown task {self.task!r}; known tasks: {', '.join(sorted(TASKS))}")
        if not self.dpc or self.dpc[0] < 1:
            raise DilmError(f"dpc must be positive integers, got {self.dpc}")
        for name in ("n_sets", "inner_loop", "syn_per_class", "real_per_class", "n_rep_sets", "generate_interval",
                     "over_sample", "lm_batch_size", "checkpoint_interval", "length_cap", "val_sets", "val_seeds",
                     "val_dpc", "learner_batch_size"):
            if getattr(self, name) < 1:
                raise DilmError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lm_steps", "outer_loops", "model_step_per_inner_step", "val_interval", "max_length",
                     "max_new_tokens", "pool_per_class", "rep_pool_per_class", "val_steps", "lm_weight_decay",
                     "generator_weight_decay"):
            if getattr(self, name) < 0:
                raise DilmError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.outer_loops and self.outer_loops % self.generate_interval:
            raise DilmError(f"outer_loops ({self.outer_loops}) must be a multiple of generate_interval "
                            f"({self.generate_interval})")
        if self.val_interval and self.outer_loops and self.outer_loops % self.val_interval:
            raise DilmError(f"outer_loops ({self.outer_loops}) must be a multiple of val_interval "
                            f"({self.val_interval})")
        if self.pool_per_class and self.syn_per_class > self.pool_per_class:
            raise DilmError(f"syn_per_class ({self.syn_per_class}) exceeds pool_per_class ({self.pool_per_class})")
        if self.rep_pool_per_class and self.rep_pool_per_class < self.real_per_class:
            raise DilmError(f"rep_pool_per_class ({self.rep_pool_per_class}) is smaller than real_per_class "
                            f"({self.real_per_class})")
        if self.pooling not in POOLINGS:
            raise DilmError(f"unknown pooling {self.pooling!r}; known: {', '.join(POOLINGS)}")
        if self.temperature <= 0 or self.generator_lr <= 0 or self.lm_lr <= 0:
            raise DilmError("temperature, generator_lr and lm_lr must be > 0")
        if not 0 < self.length_quantile <= 1:
            raise DilmError(f"length_quantile must be in (0, 1], got {self.length_quantile}")
        if self.gen_loss_norm not in GEN_LOSS_NORMS:
            raise DilmError(f"unknown gen_loss_norm {self.gen_loss_norm!r}; known: {', '.join(GEN_LOSS_NORMS)}")
        if self.sampler not in SAMPLER_MODES:
            raise DilmError(f"unknown sampler {self.sampler!r}; known: {', '.join(SAMPLER_MODES)}")
        resolve_template(self.prompt_template, self.task)  # a template without {label} fails here

    @property
    def total_match_steps(self) -> int:
        return self.outer_loops * self.inner_loop

    @property
    def pool_size(self) -> int:
        """Synthetic texts per class per pool: one per mini-batch slot of the pool's lifetime by default."""
        return self.pool_per_class or self.syn_per_class * self.inner_loop * self.generate_interval

    @classmethod
    def from_preset(cls, preset: str = "gpu", **overrides) -> DistillConfig:
        if preset not in PRESETS:
            raise DilmError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise DilmError(f"unknown distill option(s) {unknown}; see `dilm distill --help`")
        values = {**PRESETS[preset], **overrides}
        if isinstance(values.get("dpc"), int | str):
            values["dpc"] = tuple(int(x) for x in str(values["dpc"]).split(","))
        return cls(**values)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


PRESETS: dict[str, dict] = {
    # tiny random models on CPU, < 2 min: exercises every stage, quality meaningless
    "smoke": dict(generator="tiny-llama", learner="tiny-bert", dpc=(2,), n_sets=2, lm_steps=10, lm_batch_size=8,
                  outer_loops=2, inner_loop=2, model_step_per_inner_step=1, syn_per_class=4, real_per_class=8,
                  n_rep_sets=2, rep_pool_per_class=200, generate_interval=1, val_interval=1, val_size=40,
                  val_dpc=2, val_sets=1, val_seeds=1, val_steps=5, over_sample=3, length_cap=24, gen_batch_size=16,
                  generator_lr=1e-4, probe="tiny-bert"),
    # packaged real models at CPU scale (the `make demo` sweep): few steps, short texts; the representative sets
    # cluster 1,000 examples per class, not the whole class (embedding all of SST-2 takes minutes on 2 cores);
    # validation is 1 set x 1 seed x 30 learner steps (the default 3 x 3 x 200 alone takes minutes on 2 cores);
    # top_p 0.6, not 0.95: a short LM stage leaves the 0.95 nucleus in word salad and off-label (SST-2, 80 samples
    # after 4 LM steps: 91.0 % of words in the training vocabulary, 48.8 % label agreement, at 0.6 96.8 % and
    # 63.7 %; after 150 steps at lr 1e-4, batch 8: 94.1 % / 68.8 % at 0.95, 98.2 % / 76.2 % at 0.6;
    # bench/top_p_quality.py). 60 LM steps of 8 at lr 1e-4 (~3.5 min on one thread, as a demo-sweep trial has):
    # the LM stage, not the prompt, is what teaches the label
    "demo": dict(dpc=(2, 4), n_sets=2, lm_steps=60, lm_batch_size=8, length_cap=128, outer_loops=1, inner_loop=2,
                 model_step_per_inner_step=1, syn_per_class=4, real_per_class=8, n_rep_sets=1,
                 rep_pool_per_class=1000, generate_interval=1, val_interval=1, val_size=100, val_dpc=2,
                 val_sets=1, val_seeds=1, val_steps=30, top_p=0.6,
                 over_sample=2, gen_batch_size=16, generator_lr=1e-5, learner_batch_size=16),
    # one H100, whole pipeline in one 10-minute command (evaluation of 10 sets included)
    "gpu": dict(lm_steps=1500, lm_batch_size=64, outer_loops=20, inner_loop=10, model_step_per_inner_step=10,
                syn_per_class=64, real_per_class=200, n_rep_sets=5, generate_interval=5, val_interval=5,
                over_sample=20, n_sets=10, generator_lr=3e-6, gen_batch_size=2048, probe_examples=0),
    # the reference's defaults (configs/train/{lm,dc}.yaml of the DiLM code), item by item; many GPU hours
    "paper": dict(generator="gpt2", learner="bert-base-uncased", dpc=(5, 10, 20), n_sets=20,
                  lm_steps=80000, lm_lr=1e-5, lm_weight_decay=0.01, lm_batch_size=64,
                  length_quantile=1.0, length_cap=1024,  # the longest example: SST-2's 68 GPT-2 tokens
                  outer_loops=2000, inner_loop=10, model_step_per_inner_step=20,  # 20,000 generator steps
                  generator_lr=3e-7, generator_weight_decay=0.01, syn_per_class=64, real_per_class=200,
                  n_rep_sets=10, rep_pool_per_class=0, pool_per_class=0, generate_interval=20, pooling="cls",
                  temperature=1.0, gen_loss_norm="batch", lm_lambda=0.0, all_layers=False, learner_lr=1e-4,
                  learner_batch_size=64, val_interval=200, val_dpc=20, val_sets=5, val_seeds=5, val_steps=200,
                  over_sample=100, top_p=0.95, drop_unfinished=False, probe_examples=0),
}


@dataclass
class DistillResult:
    output_dir: Path
    sets: dict[int, list[Path]]
    provenance: Path
    history: list[dict]
    best_val_accuracy: float | None
    timings: dict[str, float]


Callback = Callable[[dict], None]


# --------------------------------------------------------------------------- state and checkpoints


@dataclass
class State:
    stage: str = "lm"  # lm → match → select → done
    step: int = 0  # global step: lm steps, then matching steps continue the count
    outer: int = 0  # completed outer loops
    best_val: float | None = None
    history: list[dict] = field(default_factory=list)


def _ckpt_dir(cfg: DistillConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoint"


def save_checkpoint(cfg: DistillConfig, generator, state: State, best_state: dict | None,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Atomic: write into a fresh folder, then swap it in. The matching optimiser's moments go with it."""

    def fill(tmp: Path) -> None:
        torch.save({"generator": generator.state_dict(), "best": best_state,
                    "optimizer": optimizer.state_dict() if optimizer is not None else None}, tmp / "weights.pt")
        write_json(tmp / "state.json", {**dataclasses.asdict(state), "config": cfg.to_dict()})

    atomic_write_dir(_ckpt_dir(cfg), fill)


def load_checkpoint(cfg: DistillConfig, generator, device) -> tuple[State, dict | None, dict | None]:
    """(state, best generator weights, matching optimiser state) of the last checkpoint, or a fresh start."""
    d = _ckpt_dir(cfg)
    if not (d / "state.json").exists():
        return State(), None, None
    saved = json.loads((d / "state.json").read_text())
    mismatch = {k for k, v in saved.pop("config").items()
                if k not in ("n_sets", "device", "fail_at_step") and cfg.to_dict().get(k) != v}
    if mismatch:
        raise DilmError(f"{d} holds a checkpoint of a different configuration ({sorted(mismatch)}); "
                        "use another --output-dir")
    weights = torch.load(d / "weights.pt", map_location=device)
    generator.load_state_dict(weights["generator"])
    return State(**saved), weights["best"], weights.get("optimizer")


# --------------------------------------------------------------------------- the shared LM stage

@dataclass(frozen=True)
class LMStageConfig:
    """Every config field the LM stage reads, under the :class:`DistillConfig` names: the stage's code takes this
    object, not the whole config, so a field it reads is a field of its cache key (:func:`lm_cache_key`)."""

    generator: str
    lm_steps: int
    lm_lr: float
    lm_weight_decay: float
    lm_batch_size: int
    max_length: int
    length_quantile: float
    length_cap: int
    seed: int

    @classmethod
    def of(cls, cfg: DistillConfig) -> LMStageConfig:
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


LM_KEYS = tuple(f.name for f in dataclasses.fields(LMStageConfig))  # the DistillConfig fields of the LM stage
LM_META = "dilm_lm.json"  # beside the Hugging Face files of an LM-stage checkpoint


def split_train(cfg: DistillConfig, task: TaskData) -> tuple[list[Example], list[Example]]:
    """(train, val): a seeded validation part held out of the training split (the test split is never looked at).
    The LM stage and the matching stage train on the first."""
    train = list(task.train)
    random.Random(cfg.seed).shuffle(train)
    n_val = min(cfg.val_size, len(train) // 5) if cfg.val_interval else 0
    return train[n_val:], train[:n_val]


def lm_cache_key(cfg: DistillConfig, task: TaskData | None = None) -> str:
    """Content key of the LM stage: its :class:`LMStageConfig`, the rendered prompt template and a hash of the
    training examples it sees. Configs with equal keys share one checkpoint; any other field (matching stage, DPC,
    …) does not enter it."""
    task = task or load_task(cfg.task)
    train, _ = split_train(cfg, task)
    payload = {**dataclasses.asdict(LMStageConfig.of(cfg)), "prompt": resolve_template(cfg.prompt_template, task.name),
               "labels": list(task.label_names), "data": task_fingerprint(train, task.label_names)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def read_lm_meta(path: str | Path) -> dict:
    d = Path(path)
    if not d.is_dir():
        raise DilmError(f"LM checkpoint {d} does not exist")
    if not (d / LM_META).exists():
        raise DilmError(f"{d} is not an LM-stage checkpoint written by dilm (no {LM_META}); see train_lm")
    return json.loads((d / LM_META).read_text())


def _lm_key(path: Path) -> str | None:
    return json.loads((path / LM_META).read_text())["key"] if (path / LM_META).exists() else None


def train_lm(cfg: DistillConfig, out_dir: str | Path | None = None, task: TaskData | None = None,
             callback: Callback | None = None) -> Path:
    """Run only the LM stage; save the generator (an ordinary Hugging Face checkpoint, with its tokenizer and
    ``dilm_lm.json``) in ``out_dir`` (default ``<output_dir>/lm``), atomically. A folder already holding this
    config's :func:`lm_cache_key` is reused as it is; concurrent callers (a file lock) train it once.
    ``DistillConfig(lm_checkpoint=<the returned path>)`` then starts matching from it."""
    task = task or load_task(cfg.task)
    out = Path(out_dir) if out_dir is not None else Path(cfg.output_dir) / "lm"
    key = lm_cache_key(cfg, task)
    if _lm_key(out) == key:
        return out
    with file_lock(out.with_name(f".{out.name}.lock")):
        if _lm_key(out) == key:  # trained by the caller that held the lock before us
            return out
        run = Distiller(dataclasses.replace(cfg, lm_checkpoint=""), callback, task)
        state = State()
        t0 = time.perf_counter()
        run.lm_stage(state)
        last = [r["lm_loss"] for r in state.history if "lm_loss" in r]

        def fill(tmp: Path) -> None:
            run.generator.save_pretrained(tmp)
            run.gen_tok.save_pretrained(tmp)
            write_json(tmp / LM_META, {
                "key": key, "generator": cfg.generator, "task": task.name, "label_names": list(task.label_names),
                "prompt_template": run.template, "config": dataclasses.asdict(LMStageConfig.of(cfg)),
                "train_examples": len(run.train), "final_lm_loss": last[-1] if last else None,
                "lm_s": time.perf_counter() - t0, "dilm_version": dilm.__version__,
                "git_revision": dilm.git_revision()})

        atomic_write_dir(out, fill)
    return out


def load_lm_checkpoint(path: str | Path, cfg: DistillConfig, task: TaskData, template: str, device):
    """The generator saved by :func:`train_lm`, after checking it fits this run (generator, labels, prompt)."""
    meta = read_lm_meta(path)
    for what, theirs, ours in (("generator", meta["generator"], cfg.generator),
                               ("label names", meta["label_names"], list(task.label_names)),
                               ("prompt template", meta["prompt_template"], template)):
        if theirs != ours:
            raise DilmError(f"LM checkpoint {path} was trained with {what} {theirs!r}, this run has {ours!r}")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)


# --------------------------------------------------------------------------- the run


class Distiller:
    """Holds models, data and optimisers of one distillation; ``fit`` runs the stages."""

    def __init__(self, cfg: DistillConfig, callback: Callback | None = None, task: TaskData | None = None):
        self.cfg = cfg
        self.callback = callback or (lambda m: None)
        self.device = pick_device(cfg.device)
        resolve_model(cfg.generator), resolve_model(cfg.learner)
        self.task = task or load_task(cfg.task)
        for d in cfg.dpc:
            check_dpc(self.task, d)
        self.rng = random.Random(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.train, self.val = split_train(cfg, self.task)
        self.template = resolve_template(cfg.prompt_template, self.task.name)
        self.gen_tok = load_tokenizer(cfg.generator)
        self.learn_tok = load_tokenizer(cfg.learner)
        if cfg.lm_checkpoint:
            self.generator = load_lm_checkpoint(cfg.lm_checkpoint, cfg, self.task, self.template, self.device)
        else:
            self.generator = load_model(cfg.generator, "causal-lm", device=self.device)
        self.timings: dict[str, float] = {}
        self._train_ids: dict[int, list[int]] = {}  # learner token ids of training examples, filled as drawn

    # ---- helpers
    def emit(self, state: State, **metrics) -> None:
        row = {"step": state.step, **metrics}
        state.history.append(row)
        self.callback(dict(row))

    @functools.cached_property
    def sampler(self) -> Sampler:
        cfg = self.cfg
        return make_sampler(self.generator, self.gen_tok, self.device, max_new_tokens=self.limits["max_new_tokens"],
                            batch_size=cfg.gen_batch_size, label_names=self.task.label_names, mode=cfg.sampler,
                            template=self.template)

    def sample(self, counts: list[int], seed: int, label_names: list[str] | None = None) -> list[list[Sample]]:
        """``counts[i]`` distinct usable samples of ``label_names[i]`` (default: the task's classes; fewer if the
        generator cannot), all sampled in shared batches."""
        cfg = self.cfg
        out = sample_classes(self.sampler, self.gen_tok, label_names or self.task.label_names, counts,
                             self.task.is_pair, top_p=cfg.top_p, seed=seed, allow_unfinished=not cfg.drop_unfinished,
                             template=self.template)
        self.generator.train()
        return out

    @functools.cached_property
    def full_corpus(self) -> TokenizedCorpus:
        """The training split rendered and tokenised once, whole."""
        return TokenizedCorpus.build(self.gen_tok, self.train, self.task.label_names, template=self.template)

    @functools.cached_property
    def limits(self) -> dict[str, int]:
        """Token limits: the config's, or (0) the ``length_quantile`` of the training data's, at most
        ``length_cap``: ``max_length`` of a rendered example (prompt and EOS included) for the LM stage,
        ``max_new_tokens`` of what follows the prompt for sampling."""
        cfg, tok = self.cfg, self.gen_tok
        prompt_len = [len(tok(prompt(n, self.template), add_special_tokens=False)["input_ids"])
                      for n in self.task.label_names]
        rendered = [len(s) for s in self.full_corpus.sequences]
        new = [n - prompt_len[e.label] for n, e in zip(rendered, self.train)]
        return {"max_length": cfg.max_length or length_limit(rendered, cfg.length_quantile, cfg.length_cap),
                "max_new_tokens": cfg.max_new_tokens or length_limit(new, cfg.length_quantile, cfg.length_cap)}

    @functools.cached_property
    def corpus(self) -> TokenizedCorpus:
        """The LM stage's sequences: the training split cut at ``limits["max_length"]`` (LM stage and lm_lambda
        mixing share it)."""
        return self.full_corpus.truncated(self.limits["max_length"])

    @functools.cached_property
    def feature_model(self) -> torch.nn.Module:
        """The learner's backbone, loaded once per run for all feature computations."""
        return load_model(self.cfg.learner, "base", device=self.device)

    @functools.cached_property
    def val_evaluator(self) -> Evaluator:
        """Evaluation on the held-out part of train (the test split is never looked at); models stay loaded."""
        cfg = self.cfg
        task = TaskData(self.task.name, self.task.label_names, self.train, self.val, self.task.is_pair)
        return Evaluator(task, EvalConfig(archs=(cfg.learner,), seeds=cfg.val_seeds, steps=cfg.val_steps,
                                          device=cfg.device, progress=False))

    @functools.cached_property
    def probe(self) -> LabelProbe | None:
        """The label-agreement probe (fitted on the task's training split once, then cached on disk)."""
        cfg = self.cfg
        if not cfg.probe:
            return None
        model = self.feature_model if cfg.probe == cfg.learner else load_model(cfg.probe, "base", device=self.device)
        return LabelProbe.for_task(self.task, cfg.probe, self.device, model, cfg.probe_examples)

    def log_agreement(self, state: State, name: str, by_class: list[list]) -> None:
        """``name`` = % of texts the probe assigns to the class they were generated for (``by_class[c]``)."""
        if self.probe is not None:
            self.emit(state, stage=state.stage, **{name: 100 * self.probe.agreement(by_class)})

    def features(self, items) -> torch.Tensor:
        """Features of examples or samples under the pre-trained learner's body (``pooling``: [CLS] by default; a
        pair through the tokenizer's pair API) → (N, H) on CPU."""
        texts, pairs = pair_args(items)
        return embed(texts, self.cfg.learner, self.device, self.cfg.pooling, model=self.feature_model, pairs=pairs)

    @torch.no_grad()
    def learner_features(self, learner, rows: list[list[int]], batch: int = 256) -> torch.Tensor:
        """Features of pre-tokenised rows under a learner as it is now (its own last layer, ``pooling``)."""
        was_training = learner.training
        learner.eval()
        out = []
        for i in range(0, len(rows), batch):
            enc = pad_ids(rows[i: i + batch], self.learn_tok.pad_token_id, self.device)
            with autocast(self.device):
                hidden = learner(**enc, output_hidden_states=True).hidden_states[-1].float()  # (B, T, H)
            out.append(pool(hidden, enc["attention_mask"], self.cfg.pooling).cpu())
        learner.train(was_training)
        return torch.cat(out)

    def fresh_learner(self, seed: int):
        return load_model(self.cfg.learner, "classifier", self.task.num_classes, self.device, seed=seed)

    def learner_inputs(self, examples) -> dict[str, torch.Tensor]:
        texts, pairs = pair_args(examples)  # a pair through the tokenizer's pair API (separator, segment ids)
        return encode(self.learn_tok, texts, LEARNER_MAX_LEN, self.device, pairs)

    def learner_ids(self, items) -> list[list[int]] | list[dict]:
        """Learner token ids of examples or samples (pairs: with segment ids), tokenised once so steps only pad
        (no per-step host work)."""
        texts, pairs = pair_args(items)
        return tokenize(self.learn_tok, texts, LEARNER_MAX_LEN, pairs)

    def train_ids(self, idx: list[int]) -> list[list[int]]:
        """Learner token ids of training examples by index, each tokenised the first time it is drawn."""
        missing = [i for i in dict.fromkeys(idx) if i not in self._train_ids]
        if missing:
            self._train_ids.update(zip(missing, self.learner_ids([self.train[i] for i in missing])))
        return [self._train_ids[i] for i in idx]

    # ---- stage 1
    def lm_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """The reference's LM stage: AdamW (``lm_lr``, ``lm_weight_decay``), cosine schedule with 10 % warm-up."""
        cfg = LMStageConfig.of(self.cfg)
        opt = torch.optim.AdamW(self.generator.parameters(), lr=cfg.lm_lr, weight_decay=cfg.lm_weight_decay,
                                fused=self.device.type == "cuda")
        return opt, get_cosine_schedule_with_warmup(opt, int(0.1 * cfg.lm_steps), cfg.lm_steps)

    def lm_stage(self, state: State) -> None:
        cfg = LMStageConfig.of(self.cfg)  # what this stage reads is what its cache key hashes
        corpus = self.corpus
        opt, sched = self.lm_optimizer()
        for _ in range(state.step):
            sched.step()  # resume: the schedule continues where it stopped
        self.generator.train()
        for step in tqdm(range(state.step, cfg.lm_steps), desc="lm", initial=state.step, total=cfg.lm_steps):
            loss = lm_loss(self.generator, corpus.batch(cfg.lm_batch_size, self.rng, self.device), self.device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.generator.parameters(), 1.0)
            opt.step()
            sched.step()
            state.step = step + 1
            if step % 10 == 0 or state.step == cfg.lm_steps:
                self.emit(state, stage="lm", lm_loss=loss.item(), lr=sched.get_last_lr()[0])
        state.stage = "match"

    # ---- stage 2 pieces
    def representative_sets(self) -> list[list[list[Example]]]:
        """[class][set] → real examples: per class, ``n_rep_sets`` k-means runs (k = ``real_per_class``, seeds
        differ) over the whole class (or ``rep_pool_per_class`` of it) on the pre-trained learner's features, the
        example nearest each centroid."""
        cfg = self.cfg
        out = []
        for c, group in enumerate(_by_class(self.train, self.task.num_classes)):
            if cfg.rep_pool_per_class and len(group) > cfg.rep_pool_per_class:
                rng = random.Random(derive_seed(cfg.seed, "representative pool", c))
                group = rng.sample(group, cfg.rep_pool_per_class)
            k = min(cfg.real_per_class, len(group))
            feats = self.features(group)
            out.append([[group[i] for i in kmeans_nearest(feats, k, cfg.seed + r, n_init=1)]
                        for r in range(cfg.n_rep_sets)])
        return out

    def regenerate_pool(self, seed: int, learner) -> list[tuple[list[Sample], list[list[int]], list[list[int]]]]:
        """Per class: ``pool_size`` samples, their ``syn_per_class`` k-means clusters on ``learner``'s current
        features (lists of sample indices) and their learner token ids."""
        cfg = self.cfg
        pools = []
        sampled = self.sample([cfg.pool_size] * self.task.num_classes, seed)
        for name, samples in zip(self.task.label_names, sampled):
            if len(samples) < cfg.syn_per_class:
                raise DilmError(f"the generator produced only {len(samples)} usable texts for class {name!r} "
                                f"(need syn_per_class={cfg.syn_per_class}); train the LM longer")
            ids = self.learner_ids(samples)
            feats = self.learner_features(learner, ids)
            km = KMeans(n_clusters=cfg.syn_per_class, n_init=1, random_state=seed).fit(feats.double().numpy())
            clusters = [[i for i, lab in enumerate(km.labels_) if lab == j] for j in range(cfg.syn_per_class)]
            pools.append((samples, [cl for cl in clusters if cl], ids))
        return pools

    def generator_step(self, state, opt, sched, learner, rep_sets, pools, corpus, slot: int) -> dict:
        """One matching step over all classes; returns its metrics. The real batch is the next representative set
        (in order); the synthetic batch is member ``slot`` of every pool cluster (``slot`` counts the steps since
        the pool was generated, so members are used once each until a cluster runs out, then again from its
        start)."""
        cfg = self.cfg
        learner.eval()  # gradients compared without dropout; the learner itself is only read
        params = matched_params(learner, cfg.all_layers)
        match_step = state.step - cfg.lm_steps
        total, sims = 0.0, []
        opt.zero_grad(set_to_none=True)
        for c in range(self.task.num_classes):
            real = rep_sets[c][match_step % len(rep_sets[c])]  # pre-encoded learner inputs
            with torch.no_grad():  # a constant for the generator: no graph kept
                g_real = class_gradient(learner, params, real, c)
            samples, clusters, learner_ids = pools[c]
            picks = [cl[slot % len(cl)] for cl in clusters]
            ids, am, tm = pad_samples([samples[i] for i in picks], self.gen_tok.pad_token_id, self.device)
            w = sample_weights(generation_loss(self.generator, ids, am, tm, self.device, cfg.gen_loss_norm),
                               cfg.temperature)
            syn = pad_ids([learner_ids[i] for i in picks], self.learn_tok.pad_token_id, self.device)
            g_syn = class_gradient(learner, params, syn, c, weights=w)
            loss = match_loss(g_real, g_syn) / self.task.num_classes
            loss.backward()  # per class: frees this class's graph before the next
            total += loss.item()
            sims.append(1 - loss.item() * self.task.num_classes)
        if cfg.lm_lambda:
            mix = cfg.lm_lambda * lm_loss(self.generator, corpus.batch(cfg.lm_batch_size, self.rng, self.device),
                                          self.device)
            mix.backward()
        torch.nn.utils.clip_grad_norm_(self.generator.parameters(), 1.0)
        opt.step()
        sched.step()
        return {"match_loss": total, "grad_sim": sum(sims) / len(sims), "lr": sched.get_last_lr()[0]}

    def match_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """The reference's matching stage: AdamW (``generator_lr``, ``generator_weight_decay``), cosine schedule
        with 5 % warm-up over all matching steps."""
        cfg = self.cfg
        opt = torch.optim.AdamW(self.generator.parameters(), lr=cfg.generator_lr,
                                weight_decay=cfg.generator_weight_decay)
        return opt, get_cosine_schedule_with_warmup(opt, max(1, int(0.05 * cfg.total_match_steps)),
                                                    cfg.total_match_steps)

    def learner_optimizer(self, learner) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """The evaluation protocol's optimiser for the inner learner: AdamW (``learner_lr``, the protocol's weight
        decay), linear warm-up over the protocol's share then decay, over ``inner_loop × model_step_per_inner_step``
        steps (as the reference; the last inner step takes none, so the decay never quite reaches 0)."""
        cfg = self.cfg
        opt = torch.optim.AdamW(learner.parameters(), lr=cfg.learner_lr, weight_decay=PROTOCOL.weight_decay)
        total = cfg.inner_loop * cfg.model_step_per_inner_step
        return opt, torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: linear_warmup_decay(s, total, PROTOCOL.warmup_ratio))

    def inner_learner_steps(self, learner, learner_opt, learner_sched) -> None:
        """``model_step_per_inner_step`` steps on random real batches, in eval mode (no dropout), clipped."""
        learner.eval()
        for _ in range(self.cfg.model_step_per_inner_step):
            idx = self.rng.sample(range(len(self.train)), min(self.cfg.learner_batch_size, len(self.train)))
            with autocast(self.device):
                logits = learner(**pad_ids(self.train_ids(idx), self.learn_tok.pad_token_id, self.device)).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(
                [self.train[i].label for i in idx], device=self.device))
            learner_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(learner.parameters(), PROTOCOL.clip)
            learner_opt.step()
            learner_sched.step()

    def validate(self, seed: int) -> float:
        """Accuracy (%) on the held-out split, mean over ``val_sets`` freshly selected val_dpc sets ×
        ``val_seeds`` learners trained by the protocol."""
        cfg = self.cfg
        t = time.perf_counter()
        n, c = max(2, cfg.over_sample) * cfg.val_dpc, self.task.num_classes
        cands = self.sample([n] * (c * cfg.val_sets), seed, list(self.task.label_names) * cfg.val_sets)
        sets = [self.select(cfg.val_dpc, seed + k, cands[k * c: (k + 1) * c]) for k in range(cfg.val_sets)]
        acc = self.val_evaluator.evaluate(sets).mean_accuracy()
        self.timings["val_s"] = self.timings.get("val_s", 0.0) + time.perf_counter() - t
        return acc

    def maybe_validate(self, state: State, best_state: dict | None, seed: int) -> dict | None:
        """Validate at matching step 0 (the LM-only generator) and every ``val_interval`` outer loops; returns the
        best generator's weights so far (so the kept generator is never worse on validation than the LM's)."""
        cfg = self.cfg
        if not cfg.val_interval or state.outer % cfg.val_interval:
            return best_state
        acc = self.validate(seed)
        if state.best_val is None or acc > state.best_val:
            state.best_val = acc
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.generator.state_dict().items()}
        self.emit(state, stage="match", val_accuracy=acc, best_val_accuracy=state.best_val)
        return best_state

    def match_stage(self, state: State, best_state: dict | None, opt_state: dict | None = None) -> dict | None:
        cfg = self.cfg
        if cfg.outer_loops == 0:  # the vanilla-LM ablation: no representative sets to build
            state.stage = "select"
            return best_state
        corpus = self.corpus
        rep_sets = [[self.learner_inputs(s) for s in sets] for sets in self.representative_sets()]  # encoded once
        opt, sched = self.match_optimizer()
        if opt_state is not None:  # resume: AdamW moments and step counts as they were
            opt.load_state_dict(opt_state)
        for _ in range(state.outer * cfg.inner_loop):  # resume: the schedule continues where it stopped
            sched.step()
        if state.outer == 0 and cfg.outer_loops:
            best_state = self.maybe_validate(state, best_state, cfg.seed)  # step 0: the LM-only generator
        pools, learner = None, None
        bar = tqdm(range(state.outer, cfg.outer_loops), desc="match", initial=state.outer, total=cfg.outer_loops)
        for outer in bar:
            born = outer - outer % cfg.generate_interval  # the outer loop this pool belongs to
            fresh = self.fresh_learner(seed=cfg.seed + outer)
            if pools is None or outer == born:
                # clustered on the learner as the last outer loop left it (the fresh one at the start / resume)
                pools = self.regenerate_pool(cfg.seed + born, learner or fresh)
                self.log_agreement(state, "label_agreement", [samples for samples, _, _ in pools])
            learner = fresh
            learner_opt, learner_sched = self.learner_optimizer(learner)
            for inner in range(cfg.inner_loop):
                if state.step - cfg.lm_steps == cfg.fail_at_step:
                    raise RuntimeError(f"injected failure at matching step {cfg.fail_at_step}")
                slot = (outer - born) * cfg.inner_loop + inner
                metrics = self.generator_step(state, opt, sched, learner, rep_sets, pools, corpus, slot)
                state.step += 1
                self.emit(state, stage="match", **metrics)
                if inner < cfg.inner_loop - 1:  # none after the last generator step of the outer loop
                    self.inner_learner_steps(learner, learner_opt, learner_sched)
            state.outer = outer + 1
            best_state = self.maybe_validate(state, best_state, cfg.seed + outer)
            if state.best_val is not None:
                bar.set_postfix(best_val=f"{state.best_val:.1f}")
            if state.outer % cfg.checkpoint_interval == 0:
                save_checkpoint(cfg, self.generator, state, best_state, opt)
        state.stage = "select"
        return best_state

    # ---- stage 3
    def select(self, dpc: int, seed: int, candidates: list[list[Sample]]) -> SynSet:
        """DPC per class: k-means nearest-centroid among each class's generated candidates."""
        picked: list[SynExample] = []
        for c, (name, cand) in enumerate(zip(self.task.label_names, candidates)):
            if len(cand) < dpc:
                raise DilmError(f"only {len(cand)} usable candidates for class {name!r}, DPC {dpc} needs more; "
                                "train the generator longer or raise max_new_tokens / length_cap")
            feats = self.features(cand)
            picked += [SynExample(cand[i].text, c, cand[i].text_pair) for i in kmeans_nearest(feats, dpc, seed)]
        return SynSet(picked, self.task.label_names, {"dpc": dpc, "seed": seed})

    def final_sets(self, state: State) -> dict[int, list[Path]]:
        """``n_sets`` sets per DPC; every DPC of set k selects from set k's over_sample × (largest DPC)
        candidates; the candidates of all sets are sampled together (large batches). Label agreement of all
        candidates (``final_label_agreement``) and of each DPC's selected texts (``final_label_agreement/dpc<d>``)
        is emitted."""
        cfg = self.cfg
        out: dict[int, list[Path]] = {d: [] for d in cfg.dpc}
        per_set = cfg.over_sample * cfg.dpc[-1]
        c = self.task.num_classes
        # one sampling call for every (set, class): duplicates are removed within a set, not across sets
        pooled = self.sample([per_set] * (c * cfg.n_sets), derive_seed(cfg.seed, "final candidates"),
                             list(self.task.label_names) * cfg.n_sets)
        picked: dict[int, list[list[SynExample]]] = {d: [[] for _ in range(c)] for d in cfg.dpc}  # [dpc][class]
        for k in tqdm(range(cfg.n_sets), desc="select"):
            cands = pooled[k * c: (k + 1) * c]
            for d in cfg.dpc:
                synset = self.select(d, derive_seed(cfg.seed, "final set", k), cands)
                out[d].append(write_set(Path(cfg.output_dir) / "sets" / f"dpc{d}" / f"set{k:02d}.jsonl", synset))
                for e in synset.examples:
                    picked[d][e.label].append(e)
        self.log_agreement(state, "final_label_agreement", [sum(pooled[i::c], []) for i in range(c)])
        for d in cfg.dpc:
            self.log_agreement(state, f"final_label_agreement/dpc{d}", picked[d])
        return out

    def fit(self) -> DistillResult:
        cfg = self.cfg
        state, best_state, opt_state = load_checkpoint(cfg, self.generator, self.device)
        t0 = time.perf_counter()
        if state.stage == "lm" and cfg.lm_checkpoint:  # the LM stage is in that checkpoint, loaded in __init__
            state.stage, state.step = "match", cfg.lm_steps
        elif state.stage == "lm":
            self.lm_stage(state)
            save_checkpoint(cfg, self.generator, state, best_state)
        self.timings["lm_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        if state.stage == "match":
            best_state = self.match_stage(state, best_state, opt_state)
        self.timings["match_s"] = time.perf_counter() - t1
        if best_state is not None:  # keep the generator that validated best
            self.generator.load_state_dict(best_state)
        t2 = time.perf_counter()
        sets = self.final_sets(state)
        self.timings["select_s"] = time.perf_counter() - t2
        prov = write_provenance(cfg, self, state)
        return DistillResult(Path(cfg.output_dir), sets, prov, state.history, state.best_val, dict(self.timings))


def _by_class(examples, num_classes):
    groups = [[] for _ in range(num_classes)]
    for e in examples:
        groups[e.label].append(e)
    return groups


def label_agreement(history: list[dict]) -> dict:
    """The probe's label agreement (%) from a run's history: per pool regeneration and for the final sets."""
    return {"pools": [{"step": r["step"], "value": r["label_agreement"]} for r in history if "label_agreement" in r],
            "final": {k.removeprefix("final_label_agreement").lstrip("/") or "candidates": v
                      for r in history for k, v in r.items() if k.startswith("final_label_agreement")}}


def write_provenance(cfg: DistillConfig, run: Distiller, state: State) -> Path:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "transformers", "scikit-learn", "dilm"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    path = Path(cfg.output_dir) / "provenance.json"
    write_json(path, {
        "config": cfg.to_dict(), "dilm_version": dilm.__version__, "git_revision": dilm.git_revision(),
        "models": {"generator": cfg.generator, "learner": cfg.learner}, "versions": versions,
        "python": platform.python_version(), "device": str(run.device), "timings_s": run.timings,
        "steps": state.step, "best_val_accuracy": state.best_val, "token_limits": run.limits,
        "validation": {"split": "held-out part of train", "size": len(run.val)},
        "prompt_template": run.template, "lm_checkpoint": cfg.lm_checkpoint or None,
        "label_agreement": label_agreement(state.history) | {"probe": cfg.probe or None},
    })
    return path


def distill(cfg: DistillConfig, callback: Callback | None = None) -> DistillResult:
    """Run (or resume) a distillation; ``callback(metrics)`` sees every logged step."""
    return Distiller(cfg, callback).fit()


__all__ = ["DistillConfig", "DistillResult", "PRESETS", "distill", "Distiller"]
