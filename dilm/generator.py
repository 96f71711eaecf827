"""The generator: a causal LM fine-tuned to write class-conditioned texts (DiLM step 1), and its sampling.

An example is rendered ``<prompt of its class> <text>[\\npair: <text_pair>]<eos>``; sampling from the prompt of
class c yields class-c texts (pair tasks get both texts, split on the pair marker). The prompt comes from a
*template* with a ``{label}`` field: ``label`` (the key) is the bare format ``label: <name>\\ntext:``; packaged tasks
carry a plain-words template (``Here is one short positive sentence from a movie review:``) that a pre-trained
instruction model already follows, so the LM stage need not teach it the format (the "prompted warm start").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from dilm import DilmError
from dilm.device import autocast
from dilm.sampling import LABEL_TEMPLATE, Sampler, SamplingSpec
from dilm.seeds import derive_seed
from dilm.text import pad_ids

PAIR_MARK = "\npair:"
DESCRIBED_TEMPLATE = "Here is {description} labelled {label}:"  # a user task's prompt from its one-line description
TEMPLATE_KEYS = ("task", "label")  # the task's own template, or the bare label format


def resolve_template(key: str, task) -> str:
    """``task`` → the task's own template: a packaged task's plain-words one, the spec's ``prompt_template``, or for
    a task with a ``description`` "Here is {description} labelled {label}:", else the bare label format; ``label`` →
    the bare format; anything else is itself a template and must hold ``{label}``. ``task``: a
    :class:`~dilm.tasks.TaskSpec` or any task reference."""
    from dilm.tasks import TaskSpec, resolve_task

    if key == "task":
        spec = task if isinstance(task, TaskSpec) else resolve_task(task)
        if spec.prompt_template:
            return spec.prompt_template
        description = spec.description.strip().rstrip(".:")
        return DESCRIBED_TEMPLATE.replace("{description}", description) if description else LABEL_TEMPLATE
    if key == "label":
        return LABEL_TEMPLATE
    if "{label}" not in key:
        raise DilmError(f"prompt template {key!r} has no {{label}} field; use one, or a key: "
                        f"{', '.join(TEMPLATE_KEYS)}")
    return key


def prompt(label_name: str, template: str = LABEL_TEMPLATE) -> str:
    return template.replace("{label}", label_name)


def completion(text: str, text_pair: str | None) -> str:
    """What follows the prompt in a rendered example, up to (not including) EOS."""
    return f" {text}" + (f"{PAIR_MARK} {text_pair}" if text_pair is not None else "")


def render(label_name: str, text: str, text_pair: str | None, eos: str, template: str = LABEL_TEMPLATE) -> str:
    return prompt(label_name, template) + completion(text, text_pair) + eos


def parse(completion: str, is_pair: bool) -> tuple[str, str | None] | None:
    """Split a sampled completion into (text, text_pair); None when it is unusable.

    A completion ends at a following ``\nlabel:`` (the model starting another example); a single text ends at
    its line (a prompted model may go on). A pair splits on the exact marker ``\npair:`` (a word ending in
    "pair:" does not split it), keeping the first two parts.
    """
    body = completion.split("\nlabel:")[0]
    if not is_pair:
        text = body.strip().split("\n")[0].strip()
        return (text, None) if text else None
    parts = body.split(PAIR_MARK)
    if len(parts) < 2:
        return None
    text, pair = parts[0].strip(), parts[1].strip()
    return (text, pair) if text and pair else None


@dataclass
class TokenizedCorpus:
    """Pre-tokenised LM training sequences (each a list of ids), sampled into padded batches."""

    sequences: list[list[int]]
    pad_id: int

    @classmethod
    def build(cls, tok, examples, label_names, max_length: int | None = None,
              template: str = LABEL_TEMPLATE) -> TokenizedCorpus:
        """Rendered examples as token ids, cut at ``max_length`` tokens (None: whole)."""
        texts = [render(label_names[e.label], e.text, e.text_pair, tok.eos_token, template) for e in examples]
        return cls(tok(texts, add_special_tokens=False)["input_ids"], tok.pad_token_id).truncated(max_length)

    @property
    def width(self) -> int:
        """The longest sequence: the widest a batch of this corpus can be."""
        return max(map(len, self.sequences))

    def truncated(self, max_length: int | None) -> TokenizedCorpus:
        if max_length is None:
            return self
        return TokenizedCorpus([s[:max_length] for s in self.sequences], self.pad_id)

    def batch(self, size: int, rng: random.Random, device) -> dict[str, torch.Tensor]:
        seqs = [self.sequences[rng.randrange(len(self.sequences))] for _ in range(size)]
        enc = pad_ids(seqs, self.pad_id, device)
        return {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}


# model types whose masks read packed sequences from ``position_ids`` (transformers' packed-sequence masks),
# each checked against the padded loss in tests/dilm/test_sampling.py
PACKED_TYPES = frozenset({"llama", "gpt2", "qwen2", "mistral"})


def lm_loss(generator, batch: dict[str, torch.Tensor], device, precision: str | None = None) -> torch.Tensor:
    """Mean next-token NLL of a padded batch (``labels`` -100 = not scored), computed on the batch packed
    (:func:`packed`) where the model's type reads packed sequences (``PACKED_TYPES``): the same loss on fewer
    tokens; under :func:`~dilm.device.autocast` at ``precision`` (None: bf16 on a bf16 GPU only)."""
    if getattr(generator.config, "model_type", None) in PACKED_TYPES:
        batch = packed(batch)
    with autocast(device, precision):
        return generator(**batch, use_cache=False).loss.float()


def packed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A padded causal-LM batch (B, T) → its sequences packed into B' ≤ B rows as wide as the longest one.

    First-fit decreasing: sequences longest first, each into the first row with room. Each sequence's
    ``position_ids`` restart at 0, which is what tells the model's masks the sequences apart (attention stays
    inside a sequence; there is no attention mask); a row's unused tail is one more such segment, unscored. A
    sequence's first token is not scored (nothing of its own precedes it; in the padded batch nothing does
    either), so the loss is the padded batch's. Random SST-2 batches of 8 are ~60 % real tokens, packed ~90 %.
    """
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1).tolist()
    width = max(lengths)
    rows: list[list[int]] = []  # sequence indices per packed row
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(width)
        rows[r].append(i)
        room[r] -= lengths[i]
    ids = batch["input_ids"].new_zeros((len(rows), width))  # tail tokens: any id (unscored, attended by nothing)
    labels = torch.full_like(ids, -100)
    positions = torch.zeros_like(ids)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = lengths[i]
            ids[r, at: at + n] = batch["input_ids"][i][mask[i]]
            labels[r, at + 1: at + n] = batch["labels"][i][mask[i]][1:]
            positions[r, at: at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)  # the tail: a segment of its own
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


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


def make_sampler(generator, tok, device, spec: SamplingSpec, label_names: list[str] = ()) -> Sampler:
    """A :class:`Sampler` for this generator as ``spec`` says (its static shapes fit the prompts of
    ``label_names``)."""
    width = max([len(tok(prompt(n, spec.template), add_special_tokens=False)["input_ids"]) for n in label_names]
                or [16])
    return Sampler(generator, device, spec, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, prompt_width=width)


def to_sample(row: list[int], prompt_ids: list[int], tok, is_pair: bool, allow_unfinished: bool = True
              ) -> Sample | None:
    """A sampled completion (ending at EOS if it finished) → Sample, or None when unusable.

    The sample's ids are the prompt's followed by the tokens of the text it parses to (re-rendered, as the
    LM stage tokenises examples, so whatever the parser cut off is not scored by the generation loss) and EOS.
    A row that hit the token limit without EOS is kept (as the reference keeps it) unless not
    ``allow_unfinished``.
    """
    if not row or row[-1] != tok.eos_token_id:
        if not allow_unfinished:
            return None  # overlong: never finished
    else:
        row = row[:-1]
    parsed = parse(tok.decode(row, skip_special_tokens=True), is_pair)
    if parsed is None:
        return None
    ids = tok(completion(*parsed), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return Sample(parsed[0], parsed[1], prompt_ids + ids, len(prompt_ids))


def continue_pairs(sampler: Sampler, tok, prompts: list[list[int]], rows: list[list[int]], seed: int,
                   spec: SamplingSpec) -> list[list[int]]:
    """Pair completions without the ``\npair:`` marker, continued after an appended marker.

    The reference resamples such rows; a generator early in its LM stage (or a tiny test model) rarely writes
    the marker, so almost nothing would parse. Here the second text is sampled after a marker put in place of
    the EOS (or the token limit) that ended the first; the forced marker's tokens are scored by the
    generation loss like any others.
    """
    mark = tok(PAIR_MARK, add_special_tokens=False)["input_ids"]
    todo = [i for i, row in enumerate(rows) if PAIR_MARK not in tok.decode(row, skip_special_tokens=True)]
    heads = [[t for t in rows[i] if t != tok.eos_token_id] + mark for i in todo]
    tails = sampler.sample([prompts[i] + h for i, h in zip(todo, heads)], seed=seed, spec=spec) if todo else []
    out = list(rows)
    for i, head, tail in zip(todo, heads, tails):
        out[i] = head + tail
    return out


def sample_classes(sampler: Sampler, tok, label_names: list[str], counts: list[int], seed: int = 0,
                   spec: SamplingSpec | None = None) -> list[list[Sample]]:
    """Up to ``counts[c]`` distinct, parseable samples of each class c, all classes sampled in shared batches, as
    ``spec`` (default: the sampler's) says.

    A round asks for what is still missing (plus a margin for rejects: duplicates, unparseable or, unless
    ``allow_unfinished``, overlong texts); up to ``max_rounds`` rounds, stopping early when one adds nothing.
    Pair completions lacking the pair marker are continued after one (:func:`continue_pairs`).
    """
    spec = spec or sampler.spec
    sampler.sync()
    prompts = [tok(prompt(n, spec.template), add_special_tokens=False)["input_ids"] for n in label_names]
    out: list[list[Sample]] = [[] for _ in label_names]
    seen: set[tuple[int, str, str | None]] = set()
    for r in range(spec.max_rounds):
        missing = [n - len(o) for n, o in zip(counts, out)]
        ask = [0 if m <= 0 else m + m // 4 + 1 if r == 0 else 2 * m for m in missing]  # margin for rejects
        rows = [c for c, a in enumerate(ask) for _ in range(a)]
        if not rows:
            break
        sampled = sampler.sample([prompts[c] for c in rows], seed=derive_seed(seed, "round", r), spec=spec)
        if spec.is_pair:
            sampled = continue_pairs(sampler, tok, [prompts[c] for c in rows], sampled,
                                     derive_seed(seed, "pair continuation", r), spec)
        added = 0
        for c, row in zip(rows, sampled):
            s = to_sample(row, prompts[c], tok, spec.is_pair, spec.allow_unfinished)
            if s is None or len(out[c]) >= counts[c] or (c, s.text, s.text_pair) in seen:
                continue
            seen.add((c, s.text, s.text_pair))
            out[c].append(s)
            added += 1
        if added == 0:
            break
    return out


def sample_class(generator, tok, label_name: str, n: int, device, spec: SamplingSpec, seed: int = 0
                 ) -> list[Sample]:
    """Up to ``n`` distinct, parseable samples of one class (a convenience over :func:`sample_classes`)."""
    return sample_classes(make_sampler(generator, tok, device, spec), tok, [label_name], [n], seed)[0]


def pad_samples(samples: list[Sample], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention_mask, text_mask), each (B, T)."""
    enc = pad_ids([s.ids for s in samples], pad_id, device)
    tm = torch.zeros(enc["input_ids"].shape, dtype=torch.long)
    for i, s in enumerate(samples):
        tm[i, s.prompt_len: len(s.ids)] = 1
    return enc["input_ids"], enc["attention_mask"], tm.to(device)
