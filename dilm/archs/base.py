"""What a kind of architecture is (:class:`ArchKind`) and what it scores against (:class:`EvalContext`).

A kind takes the architecture names that match its ``pattern`` (the group ``model`` names the model it runs) and
turns synthetic sets into test predictions: ``score(ctx, model, sets)`` yields one prediction array per fit, with
the number of (set, seed) jobs that fit stands for (1, or ``seeds`` for a kind that is deterministic and fits once
per set). The evaluator (:mod:`dilm.evaluate`) records them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dilm import DilmError
from dilm.device import pick_device
from dilm.models import load_model, resolve_model
from dilm.protocol import EvalConfig
from dilm.synset import SynSet
from dilm.tasks import TaskData

FAMILY_WORDS = {"encoder": "an encoder", "decoder": "a decoder LM"}


class EvalContext:
    """One task's test split, the config, the device, and what is loaded or computed once and kept between calls
    (models, a probe's test embeddings): the evaluation actors of a sweep hold one each."""

    def __init__(self, task: TaskData, cfg: EvalConfig):
        self.task = task
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.test = task.test[: cfg.test_limit] if cfg.test_limit else task.test
        self._kept: dict[tuple, Any] = {}

    def kept(self, key: tuple, make: Callable[[], Any]) -> Any:
        """``make()`` the first time ``key`` is asked for, the same value after."""
        if key not in self._kept:
            self._kept[key] = make()
        return self._kept[key]

    def model(self, name: str, head: str) -> torch.nn.Module:
        return self.kept(("model", name, head), lambda: load_model(name, head, self.task.num_classes, self.device))

    def jobs(self, sets: list[SynSet]) -> list[tuple[SynSet, int]]:
        """One (set, seed) per set and training seed."""
        return [(s, seed) for s in sets for seed in range(self.cfg.seeds)]


Predictions = Iterator[tuple[np.ndarray, int]]  # test predictions of one fit, and the jobs it stands for
Score = Callable[[EvalContext, str | None, list[SynSet]], Predictions]


def no_note(sets: list[SynSet]) -> str | None:
    return None


@dataclass(frozen=True)
class ArchKind:
    """A kind of architecture: the names it takes and how it scores sets."""

    name: str  # "finetune", "probe", ...
    form: str  # the names it takes, as help and errors write them: "icl-<model>"
    pattern: re.Pattern  # full match; the group ``model`` (if any) names the model it runs
    score: Score
    title: str = ""  # what it is, in an error: "a probe"
    family: str | None = None  # the model family it needs ("encoder" or "decoder"); None: any
    aliases: Mapping[str, str] = field(default_factory=dict)  # names whose model the pattern does not say
    note: Callable[[list[SynSet]], str | None] = no_note  # how it read the sets, where that is not obvious

    def matches(self, arch: str) -> bool:
        return self.pattern.fullmatch(arch) is not None

    def model(self, arch: str) -> str | None:
        """The model ``arch`` runs (None for a kind without one)."""
        if arch in self.aliases:
            return self.aliases[arch]
        m = self.pattern.fullmatch(arch)
        return m.groupdict().get("model") if m else None

    def check(self, arch: str) -> None:
        """Fail early (before training) on a model that does not resolve or is of the wrong family."""
        if (model := self.model(arch)) is None:
            return
        try:
            family = resolve_model(model).family
        except DilmError as e:
            raise DilmError(f"{arch}: {e}") from None
        if self.family and family != self.family:
            raise DilmError(f"{arch}: {self.title} needs {FAMILY_WORDS[self.family]}, {model} is "
                            f"{FAMILY_WORDS[family]}")
