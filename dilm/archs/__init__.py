"""The architectures an evaluation trains (``--arch``): one module per kind, one table of kinds.

* :mod:`~dilm.archs.finetune` ``<model>`` — a model fine-tuned with a fresh classification head by the protocol;
* :mod:`~dilm.archs.tfidf` ``tfidf-logreg`` — TF-IDF + logistic regression trained from scratch;
* :mod:`~dilm.archs.probe` ``<model>-probe`` — logistic regression on a frozen model's mean-pooled states;
* :mod:`~dilm.archs.icl` ``icl-<model>`` — k-shot in-context learning with a decoder LM.

A name belongs to the first kind in :data:`KINDS` whose pattern it matches (``<model>`` takes any other name, so it
comes last). A new kind is a module that defines ``KIND`` (:class:`~dilm.archs.base.ArchKind`) and a line here.
"""

from __future__ import annotations

from dilm import DilmError
from dilm.archs import finetune, icl, probe, tfidf
from dilm.archs.base import ArchKind

KINDS: tuple[ArchKind, ...] = (tfidf.KIND, icl.KIND, probe.KIND, finetune.KIND)


def known() -> str:
    """The kinds as an error names them: ``tfidf-logreg (tfidf), icl-<model> (icl), ...``."""
    return ", ".join(f"{k.form} ({k.name})" for k in KINDS)


def kind_of(arch: str) -> ArchKind:
    for kind in KINDS:
        if kind.matches(arch):
            return kind
    raise DilmError(f"unknown architecture {arch!r}; known kinds: {known()}")


def check_arch(arch: str) -> None:
    """Fail early (before training) on an architecture that cannot resolve, naming the known kinds."""
    kind = kind_of(arch)
    try:
        kind.check(arch)
    except DilmError as e:
        raise DilmError(f"{e} (known kinds of architecture: {known()})") from None


def check_archs(archs, key: str = "archs") -> None:
    """:func:`check_arch` each of ``archs``, the config key ``key`` (``archs``, ``eval.archs``) named on a miss:
    configs call it when built, so that an evaluation that cannot run fails before any data is read."""
    for arch in archs:
        try:
            check_arch(arch)
        except DilmError as e:
            raise DilmError(f"{key}: {e}") from None
