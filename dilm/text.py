"""Texts to learner tensors: joining sentence pairs, tokenising, padding and attention masks.

Shapes: B texts, T tokens (the longest in the batch). Right padding is what learners read; left padding is
what a causal LM continues (every row ends at the last column).
"""

from __future__ import annotations

import torch


def join_pair(text: str, pair: str | None, sep: str = " [SEP] ") -> str:
    return text if pair is None else f"{text}{sep}{pair}"


def encode(tok, texts: list[str], max_length: int, device) -> dict[str, torch.Tensor]:
    """Right-padded, truncated (input_ids, attention_mask), each (B, T)."""
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
              padding_side="right")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def tokenize(tok, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated as :func:`encode` truncates (pre-tokenise once, pad per batch)."""
    return tok(texts, truncation=True, max_length=max_length)["input_ids"]


def pad_ids(seqs: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded (input_ids, attention_mask) of pre-tokenised sequences: what :func:`encode` gives the texts."""
    ids = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def left_pad(seqs: list[list[int]], pad_id: int, device, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), each (B, width), padded on the left so every row ends at the last column
    (``width`` defaults to the longest sequence)."""
    width = max(map(len, seqs)) if width is None else width
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def additive_mask(attention_mask: torch.Tensor, causal: bool, dtype=torch.float32) -> torch.Tensor:
    """(B, T) 0/1 mask → additive (B, 1, T, T) [causal] or (B, 1, 1, T) mask.

    Passing the 4-D mask keeps HF's mask builders, whose data-dependent shortcuts break ``vmap``, out of the way.
    """
    neg = torch.finfo(dtype).min
    keep = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T)
    if causal:
        t = attention_mask.shape[-1]
        tri = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
        keep = keep & tri  # (B, 1, T, T)
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, neg)
