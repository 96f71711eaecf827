"""Sentence features from a learner's backbone, for coreset selection and for clustering synthetic pools."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from dilm import DilmError
from dilm.models import autocast, load_model, load_tokenizer

POOLINGS = ("mean", "cls")  # of last-layer states (:func:`pool`)
EMBED_POOLINGS = (*POOLINGS, "pooler")  # embed() also reads the model's own [CLS] pooler


@torch.no_grad()
def embed(texts: list[str], model_name: str, device, pooling: str = "mean", batch_size: int = 128,
          max_length: int = 128, model: torch.nn.Module | None = None, progress: bool = False,
          pairs: list[str] | None = None) -> torch.Tensor:
    """Last-layer features → (len(texts), H) float32 on CPU. ``mean``: masked mean; ``cls``: first token;
    ``pooler``: the model's own [CLS] pooler (BERT: tanh(dense(h_cls))), what its sequence classifier's head reads.
    With ``pairs``, each text and its pair are encoded together by the tokenizer's pair API."""
    if pooling not in EMBED_POOLINGS:
        raise DilmError(f"unknown pooling {pooling!r}; known: {', '.join(EMBED_POOLINGS)}")
    tok = load_tokenizer(model_name)
    model = model or load_model(model_name, "base", device=device)
    model.eval()
    out = []
    for i in tqdm(range(0, len(texts), batch_size), desc="embed", disable=not progress):
        enc = tok(texts[i: i + batch_size], None if pairs is None else pairs[i: i + batch_size], padding=True,
                  truncation=True, max_length=max_length, return_tensors="pt", padding_side="right").to(device)
        with autocast(device):
            states = model(**enc)
        if pooling == "pooler":
            if getattr(states, "pooler_output", None) is None:
                raise DilmError(f"{model_name} has no [CLS] pooler; use pooling mean or cls")
            out.append(states.pooler_output.float().cpu())
        else:
            out.append(pool(states.last_hidden_state.float(), enc["attention_mask"], pooling).cpu())  # (B, H)
    return torch.cat(out) if out else torch.zeros(0, 0)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, H) last-layer states → (B, H): the first token (``cls``) or the masked mean (``mean``)."""
    if pooling == "cls":
        return hidden[:, 0]
    m = attention_mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)
