"""``<model>-probe`` (``minilm-probe`` = ``minilm-l6``, ``smollm2-probe`` = ``smollm2-135m``): the frozen model's
mean-pooled, unit-norm last-layer states + logistic regression trained on the set (soft labels by weighted expansion).

An encoder or a decoder LM: ``smollm2-probe`` reads features that a selection in MiniLM's feature space never saw,
so it is an independent judge of sets chosen there.

Deterministic, so one fit per set whatever ``seeds`` says. Cheap on a CPU and, unlike 200 fine-tuning steps on 20
texts, it separates good sets from bad ones.
"""

from __future__ import annotations

import re

import numpy as np

from dilm.archs.base import ArchKind, EvalContext, Predictions
from dilm.probe import fit_logreg, predict, sentence_embeddings
from dilm.synset import SynSet
from dilm.text import join_pair


def probe_predictions(ctx: EvalContext, encoder: str, synset: SynSet) -> np.ndarray:
    """Test predictions of a logistic regression on the frozen encoder's embeddings of ``synset``."""
    model = ctx.model(encoder, "base")
    test = ctx.kept(("probe test embeddings", encoder), lambda: sentence_embeddings(  # once per encoder
        [join_pair(e.text, e.text_pair) for e in ctx.test], encoder, ctx.device, model, cache=True))
    x = sentence_embeddings([join_pair(e.text, e.text_pair) for e in synset.examples], encoder, ctx.device, model)
    targets = np.array([e.target(synset.num_classes) for e in synset.examples], dtype=np.float64)
    return predict(fit_logreg(x, targets), test)


def score(ctx: EvalContext, encoder: str, sets: list[SynSet]) -> Predictions:
    for s in sets:  # deterministic: one fit per set
        yield probe_predictions(ctx, encoder, s), ctx.cfg.seeds


KIND = ArchKind("probe", "<model>-probe", re.compile(r"(?P<model>.+)-probe"), score, title="a probe",
                aliases={"minilm-probe": "minilm-l6", "smollm2-probe": "smollm2-135m"})
