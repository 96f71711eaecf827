"""``icl-<model>`` (``icl-smollm2`` = ``smollm2-135m``): k-shot in-context learning with a decoder LM.

The set's examples are the demonstrations (``text: ... / label: <word>``); the label of a test text is the one whose
label word (all its tokens) is most likely after the prompt. A soft label shows its arg-max label word; the
distribution (and the example's weight) decides which examples are shown (:func:`icl_demonstrations`); the scores
say so (:data:`ICL_SOFT_NOTE`).
"""

from __future__ import annotations

import random
import re

import numpy as np
import torch

from dilm.archs.base import ArchKind, EvalContext, Predictions
from dilm.device import autocast
from dilm.models import load_tokenizer
from dilm.synset import SynExample, SynSet
from dilm.tasks import Example
from dilm.text import join_pair, left_pad

ICL_SOFT_NOTE = ("ICL shows each demonstration's arg-max label word; soft labels and weights decide which "
                 "examples are shown (drawn with probability ∝ weight × (max p − 1/C)), not the words")


def icl_prompt(text: str, pair: str | None, label: str | None = None) -> str:
    body = f"text: {join_pair(text, pair, ' || ')}\nlabel:"
    return body if label is None else f"{body} {label}\n\n"


@torch.no_grad()
def label_logprobs(model, tok, prompts: list[str], label_words: list[str], device,
                   batch_size: int = 16) -> torch.Tensor:
    """Log-likelihood of each label word (all its tokens) after each prompt → (len(prompts), C)."""
    out = torch.zeros(len(prompts), len(label_words))
    for c, word in enumerate(label_words):
        word_ids = tok(" " + word, add_special_tokens=False)["input_ids"]
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i: i + batch_size]
            enc = tok([p for p in chunk], add_special_tokens=False)["input_ids"]
            seqs = [e + word_ids for e in enc]
            ids, am = left_pad(seqs, tok.pad_token_id, device)  # left padding keeps the label word at the end
            with autocast(device):
                logits = model(input_ids=ids, attention_mask=am).logits.float()
            logp = torch.log_softmax(logits[:, -len(word_ids) - 1: -1], -1)  # positions predicting the word
            target = torch.tensor(word_ids, device=device).expand(len(seqs), -1)
            out[i: i + len(chunk), c] = logp.gather(-1, target[..., None]).squeeze(-1).sum(-1).cpu()
    return out


def icl_demonstrations(synset: SynSet, seed: int, shots: int) -> list[tuple[SynExample, int]]:
    """The ``shots`` demonstrations of one ICL evaluation, each with the class whose label word it shows.

    A prompt holds one label word per example, so a soft label shows the word of its **arg-max**. The
    distribution still counts: with more examples than shots, demonstrations are drawn without replacement with
    probability ∝ weight × (max p − 1/C), the label's margin over uniform — an example whose label is near
    uniform (which one word would misstate) or whose weight is 0 is shown only when nothing else is left.
    Sets whose examples all have the same margin (hard sets) get a plain seeded shuffle, as before soft labels.
    """
    c = synset.num_classes
    dists = [e.distribution(c) for e in synset.examples]
    argmax = [max(range(c), key=d.__getitem__) for d in dists]
    margin = np.array([e.weight * (max(d) - 1 / c) for e, d in zip(synset.examples, dists)])
    rng = random.Random(seed)
    if np.allclose(margin, margin[0]):
        order = list(range(len(dists)))
        rng.shuffle(order)
    else:  # weighted sampling without replacement: the k largest u^(1/w) (Efraimidis & Spirakis); w = 0 last
        keys = [rng.random() ** (1 / m) if m > 1e-12 else -rng.random() for m in margin]
        order = sorted(range(len(dists)), key=lambda i: -keys[i])
    return [(synset.examples[i], argmax[i]) for i in order[:shots]]


def icl_predict(model, tok, synset: SynSet, seed: int, test: list[Example], shots: int, device) -> np.ndarray:
    demos = icl_demonstrations(synset, seed, shots)
    prefix = "".join(icl_prompt(e.text, e.text_pair, synset.label_names[c]) for e, c in demos)
    prompts = [prefix + icl_prompt(e.text, e.text_pair) for e in test]
    return label_logprobs(model, tok, prompts, list(synset.label_names), device).argmax(-1).numpy()


def score(ctx: EvalContext, name: str, sets: list[SynSet]) -> Predictions:
    model, tok = ctx.model(name, "causal-lm").eval(), load_tokenizer(name)
    for s, seed in ctx.jobs(sets):
        yield icl_predict(model, tok, s, seed, ctx.test, ctx.cfg.icl_shots, ctx.device), 1


def note(sets: list[SynSet]) -> str | None:
    """Soft labels or weights read as ICL reads them (:data:`ICL_SOFT_NOTE`); None for hard, unweighted sets."""
    soft = any(e.soft_label is not None or e.weight != 1.0 for s in sets for e in s.examples)
    return ICL_SOFT_NOTE if soft else None


KIND = ArchKind("icl", "icl-<model>", re.compile(r"icl-(?P<model>.+)"), score, title="in-context learning",
                family="decoder", aliases={"icl-smollm2": "smollm2-135m"}, note=note)
