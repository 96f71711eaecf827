"""The configuration of one distillation, :class:`DistillConfig`, and its presets.

A preset is a data file, ``dilm/presets/<name>.yaml``: values that replace the config's defaults, one a line, each
with its reason as a comment. :func:`load_preset` reads one and checks every key is a config field with a value of
the field's type; :meth:`DistillConfig.from_preset` applies a preset, then the caller's overrides.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from dilm import DilmError
from dilm.device import PRECISIONS
from dilm.features import POOLINGS
from dilm.generator import GEN_LOSS_NORMS, resolve_template
from dilm.models import check_model
from dilm.options import option
from dilm.sampling import SAMPLER_MODES
from dilm.selection import COPY_FILTERS, FILTERS, SELECTIONS
from dilm.tasks import REFERENCE_HELP, TASKS, TaskSpec, resolve_task

FINAL_POOLS = ("per_set", "shared")
FINAL_SOURCES = ("generator", "generator+lm")
FINAL_MIXES = ("pooled", "split")
MODEL_KEYS = ("generator", "learner", "probe")  # the fields that name a model (probe: '' = none)
PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"  # dilm/presets, shipped as package data


def resume_free(f: dataclasses.Field) -> dataclasses.Field:
    """A config field that a resumed run may change: it changes nothing a run checkpoint holds (where the run goes
    on, how many final sets it writes). Every other field is checked on resume (:func:`~dilm.distill.checkpoint
    .load_checkpoint`)."""
    return dataclasses.field(default=f.default, default_factory=f.default_factory,
                             metadata={**f.metadata, "resume_free": True})


@dataclass(frozen=True)
class DistillConfig:
    task: TaskSpec = option(TASKS["sst2"], f"the task: {REFERENCE_HELP} (a name, or a spec as a mapping)")
    generator: str = option("smollm2-135m", "causal LM to fine-tune (registry name, HF id or path)")
    learner: str = option("minilm-l6", "encoder classifier whose gradients are matched")
    dpc: tuple[int, ...] = option((5, 10, 20), "data per class of the final sets")
    n_sets: int = resume_free(option(10, "final sets written per DPC (different seeds)"))
    output_dir: str = option("runs/distill", "where sets, provenance and checkpoints go")
    seed: int = option(0, "seed of the run: data split, LM batches, pools, learners and selection derive from it")
    device: str = resume_free(option("auto", "auto, cpu or cuda[:N]"))
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
    lm_precision: str = option("auto", "autocast of the LM stage, fp32 master weights either way: auto (bf16 where it "
                                       "pays: a bf16 GPU or a CPU with native bf16), fp32 or bf16",
                               choices=PRECISIONS)
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
    final_pool: str = option("per_set", "the final sets' candidates: per_set (every set samples its own over_sample x "
                                        "largest DPC per class, the reference's) or shared (one pool of that size "
                                        "per class; every set selects from its own seeded random half of it)",
                             choices=FINAL_POOLS)
    # the defaults of final_sources and final_mix, measured: bench/results/2026-12-02-cpu-quality-both-full.md and
    # bench/results/2026-12-02-cpu-quality-split.md (a --help names no file that an installed package lacks)
    final_sources: str = option("generator+lm", "whose candidates the final sets select from: generator (the "
                                                "run's generator, the reference's) or generator+lm (the LM stage's "
                                                "generator's too, the same counts, another seed: one pool of both; "
                                                "without matching, two draws of the LM's: as many drawn)",
                                choices=FINAL_SOURCES)
    final_mix: str = option("split", "with final_sources generator+lm, how a set shares out its two draws: split "
                                     "(DPC//2 per class from the LM stage's draw, the rest from the run's "
                                     "generator's, each filtered and selected on its own) or pooled (the selection "
                                     "chooses among both together); one draw: the same", choices=FINAL_MIXES)
    copy_filter: str = option("near", "before the label filter: drop candidates that copy a training text: none, "
                                      "exact, or near (>= 80 % of their word 4-grams in one training text)",
                              choices=COPY_FILTERS)
    label_filter: str = option("probe", "before selection: none, or probe (keep the candidates the probe assigns to "
                                        "their class, with probability >= filter_threshold)", choices=FILTERS)
    filter_threshold: float = option(0.9, "the probe filter's least probability of the candidate's class (0: its "
                                          "most probable class is enough)")
    selection: str = option("kmeans", "DPC among the candidates: kmeans (nearest the k-means centroids, the "
                                      "reference's 'k-centers': the class covered), herding (toward the candidates' "
                                      "mean) or herding-real (toward the class's real mean)", choices=SELECTIONS)
    select_pooling: str = option("mean", "learner features of the final selection and validation sets: mean or cls",
                                 choices=POOLINGS)
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

    def __post_init__(self):
        object.__setattr__(self, "dpc", tuple(sorted(int(d) for d in self.dpc)))
        object.__setattr__(self, "task", resolve_task(self.task))  # a name, a mapping or a spec: a spec
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
        for name, known in (("pooling", POOLINGS), ("select_pooling", POOLINGS), ("selection", SELECTIONS),
                            ("label_filter", FILTERS), ("copy_filter", COPY_FILTERS), ("final_pool", FINAL_POOLS),
                            ("final_sources", FINAL_SOURCES), ("final_mix", FINAL_MIXES),
                            ("lm_precision", PRECISIONS)):
            if getattr(self, name) not in known:
                raise DilmError(f"unknown {name} {getattr(self, name)!r}; known: {', '.join(known)}")
        if self.label_filter == "probe" and not self.probe:
            raise DilmError("label_filter probe needs a probe: set probe (e.g. minilm-l6) or label_filter none")
        if not 0 <= self.filter_threshold < 1:
            raise DilmError(f"filter_threshold must be in [0, 1), got {self.filter_threshold}")
        if self.temperature <= 0 or self.generator_lr <= 0 or self.lm_lr <= 0:
            raise DilmError("temperature, generator_lr and lm_lr must be > 0")
        if not 0 < self.length_quantile <= 1:
            raise DilmError(f"length_quantile must be in (0, 1], got {self.length_quantile}")
        if self.gen_loss_norm not in GEN_LOSS_NORMS:
            raise DilmError(f"unknown gen_loss_norm {self.gen_loss_norm!r}; known: {', '.join(GEN_LOSS_NORMS)}")
        if self.sampler not in SAMPLER_MODES:
            raise DilmError(f"unknown sampler {self.sampler!r}; known: {', '.join(SAMPLER_MODES)}")
        resolve_template(self.prompt_template, self.task)  # a template without {label} fails here

    def check_models(self, where: str = "") -> None:
        """Resolve every model the run loads (generator, learner, probe) as the run will: a miss is one line naming
        the field (``where`` prefixes it: ``fixed.``). ``dilm distill``, a sweep's config check and the run itself
        call it before any data is read; building the config does not, so that a preset naming a hub model (paper:
        gpt2) can be read where the hub cannot be reached."""
        for key in MODEL_KEYS:
            if getattr(self, key):
                check_model(getattr(self, key), where + key)

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
        """The config as data: the task as its reference (a packaged name, or its spec's mapping)."""
        return {f.name: _as_data(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _as_data(value):
    if isinstance(value, TaskSpec):
        return value.to_ref()
    return list(value) if isinstance(value, tuple) else value



def load_preset(path: str | Path) -> dict:
    """One preset file → {field: value}. Every key must be a :class:`DistillConfig` field and every value of that
    field's type (an int where a float is expected is fine; ``dpc`` is a list of ints, returned as a tuple)."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise DilmError(f"preset {path}: expected a mapping of DistillConfig fields to values")
    defaults = {f.name: f.default for f in dataclasses.fields(DistillConfig)}
    values = {}
    for key, value in data.items():
        if key not in defaults:
            raise DilmError(f"preset {path}: unknown key {key!r}; a preset sets DistillConfig fields "
                            "(see `dilm distill --help`)")
        values[key] = _typed(path, key, value, defaults[key])
    return values


def _typed(path: Path, key: str, value, default):
    """``value`` as the type of the field's ``default``, or a DilmError naming the file and key."""
    if isinstance(default, tuple) and isinstance(value, list) and all(type(v) is int for v in value):
        return tuple(value)
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if type(value) is type(default):
        return value
    hint = " (YAML reads a float without a dot, such as 1e-4, as text: write 1.0e-4)" if isinstance(value, str) else ""
    raise DilmError(f"preset {path}: {key} must be a {type(default).__name__}, got {value!r}{hint}")


PRESETS: dict[str, dict] = {p.stem: load_preset(p) for p in sorted(PRESET_DIR.glob("*.yaml"))}
