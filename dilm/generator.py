"""The generator: a causal LM fine-tuned to write class-conditioned texts (DiLM step 1), and its sampling.

An example is rendered ``label: <name>\\ntext: <text>[\\npair: <text_pair>]<eos>``; the prompt of class c is
``label: <name>\\ntext:``, so sampling from it yields class-c texts (pair tasks get both texts, split on the
pair marker).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from dilm.evaluate import pad_ids
from dilm.models import autocast
from dilm.sampling import Sampler

PAIR_MARK = "\npair:"


def prompt(label_name: str) -> str:
    return f"label: {label_name}\ntext:"


def render(label_name: str, text: str, text_pair: str | None, eos: str) -> str:
    body = f"{prompt(label_name)} {text}"
    return body + (f"{PAIR_MARK} {text_pair}" if text_pair is not None else "") + eos


def parse(completion: str, is_pair: bool) -> tuple[str, str | None] | None:
    """Split a sampled completion into (text, text_pair); None when it is unusable."""
    completion = completion.strip()
    if is_pair:
        if PAIR_MARK.strip() not in completion:
            return None
        text, _, pair = completion.partition(PAIR_MARK.strip())
        text, pair = text.strip(), pair.strip()
        return (text, pair) if text and pair else None
    text = completion.split("\nlabel:")[0].strip()
    return (text, None) if text else None


@dataclass
class TokenizedCorpus:
    """Pre-tokenised LM training sequences (each a list of ids), sampled into padded batches."""

    sequences: list[list[int]]
    pad_id: int

    @classmethod
    def build(cls, tok, examples, label_names, max_length: int) -> TokenizedCorpus:
        texts = [render(label_names[e.label], e.text, e.text_pair, tok.eos_token) for e in examples]
        ids = tok(texts, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
        return cls(ids, tok.pad_token_id)

    def batch(self, size: int, rng: random.Random, device) -> dict[str, torch.Tensor]:
        seqs = [self.sequences[rng.randrange(len(self.sequences))] for _ in range(size)]
        enc = pad_ids(seqs, self.pad_id, device)
        return {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}


def lm_loss(generator, batch: dict[str, torch.Tensor], device) -> torch.Tensor:
    with autocast(device):
        return generator(**batch).loss.float()


GEN_LOSS_NORMS = ("batch", "text")


def generation_loss(generator, input_ids: torch.Tensor, attention_mask: torch.Tensor, text_mask: torch.Tensor,
                    device, norm: str = "batch") -> torch.Tensor:
    """Generation loss ℓ_i of each sequence → (B,): the NLL of its text tokens (``text_mask`` = 1 on them, EOS
    included; not on prompt or padding), summed, then divided by

    * ``batch``: the batch's longest text in tokens, one constant for all rows — the reference code's
      Σ NLL / (padded length − 1), whose prompt is a single token. Short texts get smaller losses, so larger
      weights softmax(−ℓ/T);
    * ``text``: the row's own text length (a per-text mean NLL).
    """
    with autocast(device):
        logits = generator(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1)
    nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1): token t+1 given ≤ t
    m = text_mask[:, 1:].to(nll.dtype)
    lengths = m.sum(1)  # (B,) text tokens per row
    if norm == "text":
        return (nll * m).sum(1) / lengths.clamp(min=1)
    if norm == "batch":
        return (nll * m).sum(1) / lengths.max().clamp(min=1)
    raise ValueError(f"unknown gen_loss_norm {norm!r}; known: {', '.join(GEN_LOSS_NORMS)}")


@dataclass
class Sample:
    text: str
    text_pair: str | None
    ids: list[int]  # prompt + completion tokens, no padding
    prompt_len: int


def make_sampler(generator, tok, device, *, max_new_tokens: int, batch_size: int, label_names: list[str] = (),
                 mode: str = "dynamic") -> Sampler:
    """A :class:`Sampler` for this generator; ``mode`` is dynamic, static (KV cache) or compiled (CUDA graph)."""
    width = max([len(tok(prompt(n), add_special_tokens=False)["input_ids"]) for n in label_names] or [16])
    return Sampler(generator, device, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                   max_new_tokens=max_new_tokens, batch_size=batch_size, prompt_width=width,
                   static=mode in ("static", "compiled"), compile=mode == "compiled")


def to_sample(row: list[int], prompt_ids: list[int], tok, is_pair: bool, allow_unfinished: bool) -> Sample | None:
    """A sampled completion (ending at EOS if it finished) → Sample, or None when unusable."""
    if not row or row[-1] != tok.eos_token_id:
        if not allow_unfinished:
            return None  # overlong: never finished
        row = row + [tok.eos_token_id]
    parsed = parse(tok.decode(row[:-1], skip_special_tokens=True), is_pair)
    return None if parsed is None else Sample(parsed[0], parsed[1], prompt_ids + row, len(prompt_ids))


def sample_classes(sampler: Sampler, tok, label_names: list[str], counts: list[int], is_pair: bool, *,
                   top_p: float = 0.95, temperature: float = 1.0, seed: int = 0, max_rounds: int = 4,
                   allow_unfinished: bool = False) -> list[list[Sample]]:
    """Up to ``counts[c]`` distinct, parseable samples of each class c, all classes sampled in shared batches.

    A round asks for what is still missing (plus a margin for rejects: duplicates, unparseable or, unless
    ``allow_unfinished``, overlong texts); up to ``max_rounds`` rounds, stopping early when one adds nothing.
    """
    sampler.sync()
    prompts = [tok(prompt(n), add_special_tokens=False)["input_ids"] for n in label_names]
    out: list[list[Sample]] = [[] for _ in label_names]
    seen: set[tuple[int, str, str | None]] = set()
    for r in range(max_rounds):
        missing = [n - len(o) for n, o in zip(counts, out)]
        ask = [0 if m <= 0 else m + m // 4 + 1 if r == 0 else 2 * m for m in missing]  # margin for rejects
        rows = [c for c, a in enumerate(ask) for _ in range(a)]
        if not rows:
            break
        added = 0
        for c, row in zip(rows, sampler.sample([prompts[c] for c in rows], top_p=top_p, temperature=temperature,
                                               seed=seed * 101 + r)):
            s = to_sample(row, prompts[c], tok, is_pair, allow_unfinished)
            if s is None or len(out[c]) >= counts[c] or (c, s.text, s.text_pair) in seen:
                continue
            seen.add((c, s.text, s.text_pair))
            out[c].append(s)
            added += 1
        if added == 0:
            break
    return out


def sample_class(generator, tok, label_name: str, n: int, is_pair: bool, device, max_new_tokens: int = 48,
                 top_p: float = 0.95, batch_size: int = 64, seed: int = 0, max_rounds: int = 4,
                 allow_unfinished: bool = False) -> list[Sample]:
    """Up to ``n`` distinct, parseable samples of one class (a convenience over :func:`sample_classes`)."""
    sampler = make_sampler(generator, tok, device, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return sample_classes(sampler, tok, [label_name], [n], is_pair, top_p=top_p, seed=seed, max_rounds=max_rounds,
                          allow_unfinished=allow_unfinished)[0]


def pad_samples(samples: list[Sample], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention_mask, text_mask), each (B, T)."""
    enc = pad_ids([s.ids for s in samples], pad_id, device)
    tm = torch.zeros(enc["input_ids"].shape, dtype=torch.long)
    for i, s in enumerate(samples):
        tm[i, s.prompt_len: len(s.ids)] = 1
    return enc["input_ids"], enc["attention_mask"], tm.to(device)
