"""Texts to learner tensors: joining sentence pairs, tokenising, padding and attention masks.

Shapes: B texts, T tokens (the longest in the batch). Right padding is what learners read; left padding is
what a causal LM continues (every row ends at the last column).
"""

from __future__ import annotations

import torch


def join_pair(text: str, pair: str | None, sep: str = " [SEP] ") -> str:
    return text if pair is None else f"{text}{sep}{pair}"


def pair_args(examples) -> tuple[list[str], list[str] | None]:
    """(texts, pairs) of examples or samples, for the tokenizer's pair API; pairs is None for single texts."""
    if not any(e.text_pair is not None for e in examples):
        return [e.text for e in examples], None
    return [e.text for e in examples], [e.text_pair or "" for e in examples]


def encode(tok, texts: list[str], max_length: int, device, pairs: list[str] | None = None
           ) -> dict[str, torch.Tensor]:
    """Right-padded, truncated (input_ids, attention_mask), each (B, T); with ``pairs``, text pairs through the
    tokenizer's pair API (its separator, and ``token_type_ids`` where the model has segment ids)."""
    enc = tok(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
              padding_side="right")
    keys = ("input_ids", "attention_mask") + (("token_type_ids",) if pairs and "token_type_ids" in enc else ())
    return {k: enc[k].to(device) for k in keys}


def tokenize(tok, texts: list[str], max_length: int, pairs: list[str] | None = None) -> list[list[int]] | list[dict]:
    """Token ids per text, truncated as :func:`encode` truncates (pre-tokenise once, pad per batch with
    :func:`pad_ids`); with ``pairs``, per pair a dict of ``input_ids`` and (where the model has them)
    ``token_type_ids``."""
    enc = tok(texts, pairs, truncation=True, max_length=max_length)
    if not pairs:
        return enc["input_ids"]
    keys = ("input_ids",) + (("token_type_ids",) if "token_type_ids" in enc else ())
    return [{k: enc[k][i] for k in keys} for i in range(len(texts))]


def pad_ids(seqs: list[list[int]] | list[dict], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded (input_ids, attention_mask[, token_type_ids]) of pre-tokenised rows (id lists, or the dicts
    :func:`tokenize` gives pairs): what :func:`encode` gives the texts."""
    rows = [s if isinstance(s, dict) else {"input_ids": s} for s in seqs]
    ids = torch.full((len(rows), max(len(r["input_ids"]) for r in rows)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    types = torch.zeros_like(ids) if "token_type_ids" in rows[0] else None
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        if types is not None:
            types[i, :n] = torch.tensor(r["token_type_ids"])
    out = {"input_ids": ids, "attention_mask": mask} | ({"token_type_ids": types} if types is not None else {})
    return {k: v.to(device) for k, v in out.items()}


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
