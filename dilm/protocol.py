"""The evaluation protocol, in one place: how a fresh learner is trained on a synthetic set (docs/method.md).

:data:`PROTOCOL` holds its values: 200 steps of AdamW (lr 1e-4, weight decay 0.01), linear warm-up over the first
half of the steps then linear decay (:func:`linear_warmup_decay`), gradient clip 1.0 per model, batches of 64
examples (the whole set when smaller), 128 tokens per text. Every learner that stands in for the evaluation reads
them from here: the evaluator's ensembles (:mod:`dilm.ensemble`, through :class:`EvalConfig`, whose defaults they
are), the inner learner of the matching stage (:mod:`dilm.distill`) and the unroll of soft-label learning and TDD
(:mod:`dilm.unroll`).

:class:`EvalConfig` is one evaluation's config: the protocol's values (each an option of ``dilm evaluate``) and
which architectures, seeds and device score the sets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dilm import DilmError
from dilm.options import option


@dataclass(frozen=True)
class Protocol:
    """The values of the evaluation protocol (one instance: :data:`PROTOCOL`)."""

    steps: int = option(200, "learner steps per training")
    lr: float = option(1e-4, "AdamW learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup_ratio: float = option(0.5, "share of the steps of linear learning-rate warm-up, then linear decay")
    clip: float = option(1.0, "gradient-norm clip per model")
    batch_size: int = option(64, "examples per step (the whole set when smaller)")
    max_length: int = option(128, "token limit per text")


PROTOCOL = Protocol()


def protocol_option(name: str):
    """A config field that is the protocol's ``name``: its value as the default, its help."""
    (f,) = [f for f in dataclasses.fields(Protocol) if f.name == name]
    return option(getattr(PROTOCOL, name), f.metadata["help"])


def linear_warmup_decay(step: int, total: int, warmup_ratio: float) -> float:
    """LR multiplier at ``step`` of ``total``: linear 0→1 over the warm-up (``warmup_ratio`` of the steps), then
    1→0."""
    warm = max(1, int(total * warmup_ratio))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation: the protocol's values (defaults: :data:`PROTOCOL`) and what trains on the sets, where."""

    archs: tuple[str, ...] = option(("minilm-l6",), "architectures, comma-separated: model names, tfidf-logreg, "
                                                    "<model>-probe, icl-<model>")
    seeds: int = option(5, "training seeds per set")
    steps: int = protocol_option("steps")
    lr: float = protocol_option("lr")
    weight_decay: float = protocol_option("weight_decay")
    warmup_ratio: float = protocol_option("warmup_ratio")
    clip: float = protocol_option("clip")
    batch_size: int = protocol_option("batch_size")
    max_length: int = protocol_option("max_length")
    precision: str = option("auto", "learners' compute: auto (bf16 autocast, fp32 weights, where bf16 pays: a bf16 "
                                    "GPU, or a CPU with AVX512-BF16 or AMX), fp32 or bf16",
                            choices=("auto", "fp32", "bf16"))
    ensemble: int = option(16, "learners trained at once (vmap) on a GPU; capped by memory for large models; "
                               "one at a time on the CPU, where that is faster")
    workers: int = option(0, "CPU processes that train the fine-tuned learners side by side, the CPU threads "
                             "split among them; 0: one per CPU this process may use for fits of 100 "
                             "steps or more (1 on a GPU)")
    icl_shots: int = option(8, "demonstrations per prompt of icl-<model>")
    test_limit: int | None = option(None, "evaluate on the first N test examples only (smoke runs)")
    device: str = option("auto", "auto, cpu or cuda[:N]")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self):
        if not self.archs:
            raise DilmError("evaluation needs at least one architecture")
        if self.seeds < 1 or self.steps < 0 or self.batch_size < 1 or self.ensemble < 1 or self.workers < 0:
            raise DilmError("seeds, batch_size and ensemble must be >= 1, steps and workers >= 0")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise DilmError(f"unknown precision {self.precision!r}; known: auto, fp32, bf16")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise DilmError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        object.__setattr__(self, "archs", tuple(self.archs))
