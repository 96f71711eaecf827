"""DiLM distillation: fine-tune a generator LM, match gradients through its generation probabilities, select.

Stages (``distill``): ``lm`` (label-conditioned fine-tuning) → ``match`` (``outer_loops`` × ``inner_loop`` generator
steps; the learner re-initialised every outer loop and trained ``model_step_per_inner_step`` steps on real data
between generator steps; the synthetic pool regenerated every ``generate_interval`` outer loops) → ``select``
(``over_sample`` × DPC candidates per class from the matched generator and the LM stage's, filtered and chosen by
herding or k-means on learner features, ``n_sets`` sets).
``outer_loops = 0`` is the "vanilla LM" ablation (LM stage and selection only).

One module per part, each importing only those above it:

* :mod:`~dilm.distill.config` — :class:`DistillConfig` and the presets (``dilm/presets/*.yaml``);
* :mod:`~dilm.distill.checkpoint` — the run checkpoint and the LM-stage checkpoint on disk;
* :mod:`~dilm.distill.context` — :class:`RunContext`, what the stages share (models, data, limits, helpers);
* :mod:`~dilm.distill.lm_stage` — stage ``lm``, its :class:`LMStageConfig`, cache key and :func:`train_lm`;
* :mod:`~dilm.distill.candidates` — where the final candidates come from: counts, seeds, generators, the LM's cache;
* :mod:`~dilm.distill.select` — stage ``select``: DPC per class among candidates, the final sets;
* :mod:`~dilm.distill.match_stage` — stage ``match``: representative sets, pools, generator steps, validation;
* :mod:`~dilm.distill.run` — :func:`distill` / :class:`Distiller`, the stages in order, provenance.
"""

from dilm.distill.checkpoint import (
    LM_META,
    State,
    load_checkpoint,
    load_lm_checkpoint,
    read_lm_meta,
    save_checkpoint,
    write_lm_checkpoint,
)
from dilm.distill.config import PRESETS, SAMPLER_MODES, DistillConfig, load_preset
from dilm.distill.context import LEARNER_MAX_LEN, Callback, RunContext, split_train
from dilm.distill.lm_stage import LM_KEYS, LMStageConfig, lm_cache_key, train_lm
from dilm.distill.run import Distiller, DistillResult, distill, label_agreement, write_provenance

__all__ = [
    "LEARNER_MAX_LEN", "LM_KEYS", "LM_META", "PRESETS", "SAMPLER_MODES", "Callback", "DistillConfig", "DistillResult",
    "Distiller", "LMStageConfig", "RunContext", "State", "distill", "label_agreement", "lm_cache_key",
    "load_checkpoint", "load_lm_checkpoint", "load_preset", "read_lm_meta", "save_checkpoint", "split_train",
    "train_lm", "write_lm_checkpoint", "write_provenance",
]
