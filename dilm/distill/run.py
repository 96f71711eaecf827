"""One distillation from start (or its last checkpoint) to its final sets: :func:`distill` and :class:`Distiller`,
and the run's ``provenance.json``."""

from __future__ import annotations

import importlib.metadata as md
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import dilm
from dilm.device import gpu_paths
from dilm.distill.candidates import forget_lm_candidates, keep_lm_candidates
from dilm.distill.checkpoint import State, load_checkpoint, save_checkpoint
from dilm.distill.config import DistillConfig
from dilm.distill.context import Callback, RunContext
from dilm.distill.lm_stage import LMStageConfig, fine_tune
from dilm.distill.match_stage import match
from dilm.distill.select import final_sets
from dilm.files import write_json
from dilm.tasks import TaskData


@dataclass
class DistillResult:
    output_dir: Path
    sets: dict[int, list[Path]]  # {dpc: [set paths]}
    provenance: Path
    history: list[dict]  # every row the callback saw
    best_val_accuracy: float | None
    timings: dict[str, float]  # seconds per stage (lm_s, lm_candidates_s, match_s, select_s, val_s)
    copies: dict[int, dict]  # {dpc: memorisation report of its sets} (dilm.memorisation)


class Distiller(RunContext):
    """The run's shared context (:class:`RunContext`) and ``fit``, which runs the stages on it."""

    def fit(self) -> DistillResult:
        """LM stage (skipped when the run starts from ``lm_checkpoint``), matching, then the final sets of the
        best-validated generator (with ``final_sources`` generator+lm and the LM stage in this run, its candidates are
        sampled before matching: its weights are not kept); each stage resumes from the run checkpoint where one is."""
        cfg = self.cfg
        state, best_state, opt_state = load_checkpoint(cfg, self.generator, self.device)
        t0 = time.perf_counter()
        if state.stage == "lm" and cfg.lm_checkpoint:  # the LM stage is in that checkpoint, loaded with the context
            state.stage, state.step = "match", cfg.lm_steps
        elif state.stage == "lm":
            forget_lm_candidates(cfg)
            fine_tune(LMStageConfig.of(cfg), self.generator, self.corpus, self.rng, self.device, state, self.emit)
            save_checkpoint(cfg, self.generator, state, best_state)
        self.timings["lm_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        keep_lm_candidates(self, state)  # generator+lm: the final pool's LM part, while the generator holds its weights
        self.timings["lm_candidates_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        if state.stage == "match":
            best_state = match(self, state, best_state, opt_state)
        self.timings["match_s"] = time.perf_counter() - t1
        if best_state is not None:  # keep the generator that validated best
            self.generator.load_state_dict(best_state)
        t2 = time.perf_counter()
        sets, copies = final_sets(self, state)
        self.timings["select_s"] = time.perf_counter() - t2
        prov = write_provenance(cfg, self, state, copies)
        return DistillResult(Path(cfg.output_dir), sets, prov, state.history, state.best_val, dict(self.timings),
                             copies)


def distill(cfg: DistillConfig, callback: Callback | None = None, task: TaskData | None = None) -> DistillResult:
    """Run (or resume) a distillation; ``callback(metrics)`` sees every logged step. Pass the loaded ``task`` (the
    one ``cfg.task`` names) to use it without loading it again."""
    return Distiller(cfg, callback, task).fit()


def label_agreement(history: list[dict]) -> dict:
    """The probe's label agreement (%) from a run's history: per pool regeneration and for the final sets."""
    return {"pools": [{"step": r["step"], "value": r["label_agreement"]} for r in history if "label_agreement" in r],
            "final": {k.removeprefix("final_label_agreement").lstrip("/") or "candidates": v
                      for r in history for k, v in r.items() if k.startswith("final_label_agreement")}}


def write_provenance(cfg: DistillConfig, run: RunContext, state: State, copies: dict[int, dict]) -> Path:
    """``provenance.json``: config, versions, device (and whether it took the GPU's code paths,
    :func:`~dilm.device.gpu_paths`), timings, token limits, label agreement and the copies of training and test
    texts in each DPC's sets."""
    versions = {}
    for pkg in ("torch", "transformers", "scikit-learn", "dilm"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    path = Path(cfg.output_dir) / "provenance.json"
    write_json(path, {
        "config": cfg.to_dict(), "task": {"name": run.task.name, "spec": cfg.task.to_dict(),
                                          "sha256": run.task.fingerprint, "label_names": list(run.task.label_names),
                                          "train_examples": len(run.task.train)},
        "dilm_version": dilm.__version__, "git_revision": dilm.git_revision(),
        "models": {"generator": cfg.generator, "learner": cfg.learner}, "versions": versions,
        "python": platform.python_version(), "device": str(run.device),
        "gpu_paths": gpu_paths(run.device), "timings_s": run.timings,
        "steps": state.step, "best_val_accuracy": state.best_val, "token_limits": run.limits,
        "validation": {"split": "held-out part of train", "size": len(run.val)},
        "prompt_template": run.template, "lm_checkpoint": cfg.lm_checkpoint or None,
        "label_agreement": label_agreement(state.history) | {"probe": cfg.probe or None},
        "copies": {str(d): report for d, report in copies.items()},
    })
    return path
