"""A batched sampling loop for the generator: the speed-critical part of DiLM (pools and final candidates).

``generate`` in Hugging Face re-tokenises nothing but still pays, every decode step, for logits processors,
stopping criteria with a host sync, autocast casts of fp32 weights and small batches. Here:

* prompts of several classes go into one left-padded batch (explicit ``position_ids``), as large as memory
  allows (``batch_size``);
* where bf16 pays (GPUs, CPUs with native bf16: :func:`dilm.device.bf16_supported`) the loop runs a bf16 copy
  of the generator (no per-step weight casts; the fp32 master weights stay with the optimiser);
* top-p sampling is a few tensor ops (sort, cumulative sum, inverse-CDF draw) with no host sync on a GPU; on a
  CPU the sort of the whole vocabulary is replaced by a ``topk`` shortlist (``SHORTLIST``); the host checks
  "all finished" only every ``SYNC_EVERY`` steps (on a CPU every step); a CPU on the GPU's paths
  (:func:`dilm.device.gpu_paths`) samples as a GPU does;
* with the dynamic cache, each distinct prompt is prefilled once (all rows of a class share one) and rows that
  have sampled EOS leave the batch (their cache rows dropped) at those checks: a fine-tuned generator's texts
  end at different lengths, and the rest of a batch no longer pays for them;
* ``static=True`` uses a pre-allocated ``StaticCache`` and a full-length attention mask so the decode step
  has fixed shapes; with ``compile=True`` that step is ``torch.compile``-d (on CUDA in ``reduce-overhead``
  mode, i.e. replayed as a CUDA graph).

What a sampler does is said by one frozen :class:`SamplingSpec` (limits, top_p, batch, decode mode, precision, the
prompt template, …), handed to it in place of loose arguments; a cache of samples is keyed by the spec with the
weights, the counts and the seed.

Shapes: B rows, P prompt width (left-padded), N = ``max_new_tokens``, V vocabulary.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch

from dilm.device import PRECISIONS, gpu_paths, inference_dtype
from dilm.seeds import derive_seed
from dilm.text import left_pad

LABEL_TEMPLATE = "label: {label}\ntext:"  # the bare prompt format (dilm.generator renders and parses it)
SAMPLER_MODES = ("dynamic", "static", "compiled")


@dataclass(frozen=True)
class SamplingSpec:
    """How texts are sampled from a generator, whatever its weights: everything sampling reads but the model, the
    prompts' classes and counts, and the seed. Built once per run (:attr:`dilm.distill.RunContext.sampling`), handed
    to the :class:`Sampler` and to :func:`dilm.generator.sample_classes`, and hashed whole into the keys of sampled
    candidates."""

    generator: str = ""  # the generator's name (its tokenizer); its weights are the sampler's model
    template: str = LABEL_TEMPLATE  # the prompt of a class, with a {label} field
    is_pair: bool = False  # a completion holds two texts, split on the pair marker
    max_new_tokens: int = 48
    top_p: float = 0.95
    temperature: float = 1.0  # of the sampling softmax (not the matching weights')
    batch_size: int = 256  # rows decoded together
    mode: str = "dynamic"  # dynamic (KV cache grows), static (pre-allocated KV cache) or compiled (static + compile)
    precision: str = "auto"  # the inference copy's dtype: auto (bf16 where it pays), fp32 or bf16
    allow_unfinished: bool = True  # keep a sample that hit max_new_tokens without EOS (the reference keeps it)
    max_rounds: int = 4  # rounds of sampling what a class still misses (rejects: duplicates, unparseable texts)

    def __post_init__(self):
        if self.mode not in SAMPLER_MODES:
            raise ValueError(f"unknown sampler mode {self.mode!r}; known: {', '.join(SAMPLER_MODES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; known: {', '.join(PRECISIONS)}")


SYNC_EVERY = 8
SHORTLIST = 128  # CPU: top-p from the 128 most probable tokens, then 8x as many for rows whose nucleus is larger


def top_p_sample(logits: torch.Tensor, top_p: float, temperature: float, rng: torch.Generator,
                 shortlist: int = 0) -> torch.Tensor:
    """(B, V) logits → (B,) token ids from the smallest set of top tokens whose probability reaches ``top_p``.

    One sort and one cumulative sum; the draw is an inverse-CDF lookup (B uniforms, not B × V). With
    ``shortlist`` = K > 0 the sort is a ``topk`` of K: rows whose K most probable tokens already reach ``top_p``
    hold their whole nucleus there and draw from it exactly as from the full sort (same uniforms); the other rows
    try a shortlist 8 times larger, and only rows whose nucleus exceeds that too are sorted in full. Checking which
    rows those are is a host sync, free on a CPU (where the full sort of a 49k vocabulary costs as much as the
    model's decode step) but not on CUDA. Probabilities are ``exp(z - logsumexp(z))`` of the tempered logits ``z``
    on every path, so a shortlist only ever changes which tokens are ranked, never a probability.
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature if z is logits else z.div_(temperature)  # never scale the caller's tensor in place
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (B, 1)
    u = torch.rand((z.shape[0], 1), device=z.device, generator=rng)  # (B, 1)
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    rows, k = torch.arange(z.shape[0], device=z.device), shortlist  # the rows still to draw, the shortlist's size
    while True:
        every = len(rows) == z.shape[0]  # (rows only shrink) no copy of the logits for the first round
        zr, ur, lr = (z, u, lse) if every else (z[rows], u[rows], lse[rows])
        full = not k or k >= z.shape[-1]
        top, order = zr.sort(dim=-1, descending=True) if full else zr.topk(k, dim=-1)  # (R, K), descending
        probs = (top - lr).exp_()
        out[rows] = nucleus_draw(probs, order, ur, top_p)
        if full:
            return out
        short = probs.cumsum(-1)[:, -1] < top_p  # nucleus not inside the shortlist (top_p → 1, flat rows)
        if not bool(short.any()):
            return out
        rows, k = rows[short], k * 8


def nucleus_draw(sorted_p: torch.Tensor, order: torch.Tensor, u: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, K) probabilities in descending order, their token ids, (B, 1) uniforms → (B,) picks of the nucleus."""
    cum = sorted_p.cumsum(-1)  # (B, K)
    kept = ((cum - sorted_p) < top_p).sum(-1, keepdim=True).clamp(min=1)  # nucleus size; top_p → 0 = greedy
    mass = cum.gather(-1, kept - 1)  # (B, 1): probability of the nucleus
    pick = torch.searchsorted(cum, u * mass).clamp(max=kept - 1)  # first rank whose cumulative mass reaches u
    return order.gather(-1, pick).squeeze(-1)


def bf16_params_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with bf16 parameters and the buffers left as they are (rotary ``inv_freq`` rounded to bf16 would
    shift every position's angle); tied parameters stay tied."""
    out = copy.deepcopy(model).eval()
    for p in out.parameters():
        p.data = p.data.to(torch.bfloat16)
    return out


def bucket(rows: int, cap: int) -> int:
    """Static shapes come in a few sizes: the next power of two (at least 8), at most ``cap``."""
    return min(cap, max(8, 1 << (rows - 1).bit_length()))


class Sampler:
    """Samples completions of token prompts from a causal LM, a batch of rows at a time.

    Holds its own inference weights (a bf16 copy where bf16 pays, refreshed in place by :meth:`sync` so a compiled
    step stays valid) and, with ``static``, one pre-allocated cache per batch shape, reused. With ``static``
    batches come in a few fixed shapes (rows padded to a power of two up to ``batch_size``, prompts to
    ``prompt_width``), which is what lets ``compile`` capture the decode step once per shape. Its ``spec``'s mode and
    precision are fixed when it is built; a call may pass another spec (another top_p, limit or batch) that keeps
    them.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, spec: SamplingSpec, *, eos_id: int,
                 pad_id: int, prompt_width: int = 16, shortlist: int | None = None):
        self.source, self.device, self.spec = model, device, spec
        self.eos_id, self.pad_id, self.prompt_width = eos_id, pad_id, prompt_width
        self.static = spec.mode in ("static", "compiled")
        # auto: bf16 where it pays, fp32 (the model itself) elsewhere
        self.model = bf16_params_copy(model) if inference_dtype(device, spec.precision) == torch.bfloat16 else model
        # a shortlist saves the full sort where a host sync is free (CPU), not on CUDA
        self.shortlist = (0 if gpu_paths(device) else SHORTLIST) if shortlist is None else shortlist
        self.cache, self.static_caches = None, {}  # (rows, length) → StaticCache
        # newer transformers (5.24) call the cache argument ``cache`` (``past_key_values`` deprecated)
        self.cache_kwarg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs; on a CPU fused C++ kernels
        compiled = spec.mode == "compiled"
        self.step = torch.compile(self._forward, mode=mode, fullgraph=True) if compiled else self._forward

    def sync(self) -> None:
        """Copy the source model's current weights into the inference copy (in place)."""
        if self.model is not self.source:
            with torch.no_grad():
                for dst, src in zip(self.model.parameters(), self.source.parameters()):
                    dst.copy_(src)

    def _forward(self, tokens, positions, attention_mask, cache_position):
        return self.model(input_ids=tokens, position_ids=positions, attention_mask=attention_mask,
                          **{self.cache_kwarg: self.cache}, cache_position=cache_position, use_cache=True,
                          logits_to_keep=1).logits[:, -1]

    def _fresh_cache(self, rows: int, total: int):
        """A new dynamic cache, or the static one of this shape (kept, so a compiled step's graph stays valid)."""
        from transformers import DynamicCache, StaticCache

        if not self.static:
            return DynamicCache(config=self.model.config)
        cache = self.static_caches.get((rows, total))
        if cache is None:
            cache = self.static_caches[rows, total] = StaticCache(config=self.model.config, max_cache_len=total)
        else:
            cache.reset()
        return cache

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], *, seed: int = 0, spec: SamplingSpec | None = None) -> list[list[int]]:
        """One completion per prompt (new tokens, ending at EOS when one was sampled), in input order, as ``spec``
        (default: the sampler's) says: ``top_p``, ``temperature``, ``max_new_tokens``, ``batch_size``."""
        spec = spec or self.spec
        if (spec.mode, spec.precision) != (self.spec.mode, self.spec.precision):
            raise ValueError("a sampler's mode and precision are fixed when it is built; make another sampler")
        self.model.eval()
        out: list[list[int]] = []
        for start in range(0, len(prompts), spec.batch_size):
            chunk = prompts[start: start + spec.batch_size]
            rows = self._batch(chunk, spec, derive_seed(seed, "batch", start)).tolist()
            for row in rows[: len(chunk)]:
                out.append(row[: row.index(self.eos_id) + 1] if self.eos_id in row else row)
        return out

    def _prefill(self, prompts, ids, positions, attn, cache_position) -> torch.Tensor:
        """(B, V) logits after the prompts, their keys and values in the cache. With the dynamic cache one row per
        distinct prompt goes through the model (a class's prompt is shared by all its rows), and its cache rows
        and logits are then repeated for the rows that share it."""
        slot: dict[tuple[int, ...], int] = {}
        firsts: list[int] = []  # the first row of each distinct prompt
        for i, p in enumerate(prompts):
            if slot.setdefault(tuple(p), len(firsts)) == len(firsts):
                firsts.append(i)
        if self.static or len(firsts) == len(prompts):
            return self._forward(ids, positions, attn, cache_position)
        first = torch.tensor(firsts, device=self.device)
        which = torch.tensor([slot[tuple(p)] for p in prompts], device=self.device)  # (B,) → its distinct prompt
        logits = self._forward(ids[first], positions[first], attn[first], cache_position)  # (U, V)
        self.cache.batch_select_indices(which)  # (U, …) → (B, …)
        return logits[which]

    def _batch(self, prompts, spec: SamplingSpec, seed: int) -> torch.Tensor:
        """(B, N) new tokens; after a row's EOS the rest is EOS."""
        n_new = spec.max_new_tokens
        if self.static:  # a few fixed shapes: rows padded to a power of two, prompts to prompt_width
            prompts = prompts + [prompts[0]] * (bucket(len(prompts), spec.batch_size) - len(prompts))
        width = max(self.prompt_width if self.static else 0, *map(len, prompts))
        ids, mask = left_pad(prompts, self.pad_id, self.device, width)
        b, total = len(prompts), width + n_new
        full_mask = torch.zeros((b, total), dtype=torch.long, device=self.device)  # filled as tokens arrive
        full_mask[:, :width] = mask
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # (B, P): left padding does not shift positions
        rng = torch.Generator(device=self.device).manual_seed(seed)
        self.cache = self._fresh_cache(b, total)
        cache_positions = torch.arange(total, device=self.device)
        logits = self._prefill(prompts, ids, positions, full_mask if self.static else mask, cache_positions[:width])
        out = torch.full((b, n_new), self.eos_id, dtype=torch.long, device=self.device)
        rows = torch.arange(b, device=self.device)  # (R,): the rows still decoding, R ≤ B
        done = torch.zeros(b, dtype=torch.bool, device=self.device)  # (R,)
        last = positions[:, -1:]
        every = SYNC_EVERY if gpu_paths(self.device) else 1  # host checks: free on a CPU
        for t in range(n_new):
            token = top_p_sample(logits, spec.top_p, spec.temperature, rng, self.shortlist)
            token = token.masked_fill(done, self.eos_id)
            out[rows, t] = token
            done |= token == self.eos_id
            if t == n_new - 1:
                break
            if (t + 1) % every == 0 and (finished := int(done.sum())):
                if finished == len(rows):
                    break
                if not self.static:  # drop the finished rows: the others go on as a smaller batch
                    keep = (~done).nonzero().squeeze(1)
                    self.cache.batch_select_indices(keep)
                    rows, token, last, full_mask, done = (x[keep] for x in (rows, token, last, full_mask, done))
            full_mask[:, width + t] = 1
            last = last + 1
            attn = full_mask if self.static else full_mask[:, : width + t + 1]
            logits = self.step(token[:, None], last, attn, cache_positions[width + t: width + t + 1])
        self.cache = None  # a dynamic cache is not kept alive between calls (a static one lives in static_caches)
        return out
