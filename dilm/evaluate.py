"""Evaluation: train fresh learners on synthetic sets and report their test accuracy (docs/method.md).

Every architecture in ``EvalConfig.archs`` (:mod:`dilm.archs`: fine-tuned models, ``tfidf-logreg``,
``<model>-probe``, ``icl-<model>``) scores every set, fine-tuned learners by the protocol (:mod:`dilm.protocol`):
``cfg.seeds`` fits per set, each fit's test accuracy (and F1 on MRPC-style pair tasks) one entry of
:class:`ArchScores`. The mean over architectures is the validation score of a distillation run.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from dilm import DilmError
from dilm.archs import check_arch, kind_of
from dilm.archs.base import EvalContext
from dilm.protocol import EvalConfig
from dilm.synset import SynSet
from dilm.tasks import TaskData


@dataclass
class ArchScores:
    accuracies: list[float] = field(default_factory=list)  # one per (set, seed)
    f1s: list[float] = field(default_factory=list)
    note: str | None = None  # how the architecture read the sets, where that is not obvious (ICL and soft labels)

    @staticmethod
    def _ms(xs):
        if not xs:
            return None
        return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    def record(self, preds: np.ndarray, gold: np.ndarray, f1: bool) -> None:
        """One fit's test predictions against the gold labels; ``f1`` (binary pair tasks, as MRPC) adds its F1."""
        self.accuracies.append(float((preds == gold).mean()))
        if f1:
            from sklearn.metrics import f1_score

            self.f1s.append(float(f1_score(gold, preds)))

    def summary(self) -> dict:
        out = {"n": len(self.accuracies)}
        mean, std = self._ms(self.accuracies)
        out.update(accuracy=100 * mean, accuracy_std=100 * std)
        if self.f1s:
            f_mean, f_std = self._ms(self.f1s)
            out.update(f1=100 * f_mean, f1_std=100 * f_std)
        if self.note:
            out["note"] = self.note
        return out


@dataclass
class Scores:
    by_arch: dict[str, ArchScores]

    def summary(self) -> dict[str, dict]:
        return {arch: s.summary() for arch, s in self.by_arch.items()}

    def mean_accuracy(self) -> float:
        """Mean accuracy (%) over architectures (the validation score of a distillation run)."""
        return statistics.fmean(s.summary()["accuracy"] for s in self.by_arch.values())


class Evaluator:
    """Scores synthetic sets on one task across architectures; keeps models and tokenizers loaded between calls
    (the evaluation actors of a sweep hold one each)."""

    def __init__(self, task: TaskData, cfg: EvalConfig):
        self.task = task
        self.cfg = cfg
        self.ctx = EvalContext(task, cfg)
        self.device, self.test = self.ctx.device, self.ctx.test
        for arch in cfg.archs:
            check_arch(arch)
        self.gold = np.array([e.label for e in self.test])
        self.f1 = task.num_classes == 2 and task.is_pair  # MRPC-style tasks also report F1

    def evaluate(self, sets: list[SynSet]) -> Scores:
        for s in sets:
            if s.label_names != self.task.label_names:
                raise DilmError(f"set labels {list(s.label_names)} do not match task {self.task.name} "
                                f"labels {list(self.task.label_names)}")
            if s.meta.get("tdd_learner"):
                raise DilmError(f"this is an embedding-level TDD set, evaluable only on {s.meta['tdd_learner']}")
        out: dict[str, ArchScores] = {}
        bar = tqdm(total=len(sets) * self.cfg.seeds * len(self.cfg.archs), desc="evaluate",
                   disable=not self.cfg.progress)
        for arch in self.cfg.archs:
            kind = kind_of(arch)
            scores = out[arch] = ArchScores(note=kind.note(sets))
            for preds, jobs in kind.score(self.ctx, kind.model(arch), sets):
                scores.record(preds, self.gold, self.f1)
                bar.update(jobs)
        bar.close()
        return Scores(out)


def evaluate(sets: list[SynSet], task: TaskData, cfg: EvalConfig) -> Scores:
    return Evaluator(task, cfg).evaluate(sets)
