"""Sentence features from a learner's backbone, for coreset selection and for clustering synthetic pools."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from dilm import DilmError
from dilm.models import autocast, load_model, load_tokenizer

POOLINGS = ("mean", "cls")


@torch.no_grad()
def embed(texts: list[str], model_name: str, device, pooling: str = "mean", batch_size: int = 128,
          max_length: int = 128, model: torch.nn.Module | None = None, progress: bool = False) -> torch.Tensor:
    """Last-layer features → (len(texts), H) float32 on CPU. ``mean``: masked mean; ``cls``: first token."""
    if pooling not in POOLINGS:
        raise DilmError(f"unknown pooling {pooling!r}; known: {', '.join(POOLINGS)}")
    tok = load_tokenizer(model_name)
    model = model or load_model(model_name, "base", device=device)
    model.eval()
    out = []
    for i in tqdm(range(0, len(texts), batch_size), desc="embed", disable=not progress):
        enc = tok(texts[i: i + batch_size], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt", padding_side="right").to(device)
        with autocast(device):
            hidden = model(**enc).last_hidden_state.float()  # (B, T, H)
        out.append(pool(hidden, enc["attention_mask"], pooling).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, H) last-layer states → (B, H): the first token (``cls``) or the masked mean (``mean``)."""
    if pooling == "cls":
        return hidden[:, 0]
    m = attention_mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)
