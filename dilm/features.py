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
        if pooling == "cls":
            out.append(hidden[:, 0].cpu())
        else:
            m = enc["attention_mask"][..., None].float()
            out.append(((hidden * m).sum(1) / m.sum(1)).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)
