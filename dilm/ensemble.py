"""Ensembles of fine-tuned learners: the evaluation protocol's training machinery (docs/method.md).

N copies of one classifier are trained at once: parameters stacked with ``torch.func.stack_module_state`` and the
forward ``vmap``-ed over members (on GPUs; called in turn on the CPU), each member with its own head seed, data
order and gradient clip. The protocol (:mod:`dilm.protocol`, as an :class:`~dilm.protocol.EvalConfig` carries it):
AdamW (fused), weight decay, linear warm-up over the first ``warmup_ratio`` of the steps then linear decay
(:func:`~dilm.protocol.linear_warmup_decay`), clip per member. Shapes: N members, B rows per step, T tokens,
C classes.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap

from dilm.device import autocast, autocast_dtype, gpu_paths, training_attention
from dilm.models import head_param_names, is_causal
from dilm.protocol import EvalConfig, linear_warmup_decay
from dilm.tasks import Example
from dilm.text import additive_mask, encode, pair_args


class Ensemble:
    """N copies of one classifier, stacked for ``vmap``; member i has its own head initialised from seed i."""

    def __init__(self, base: torch.nn.Module, seeds: list[int], device, vectorized: bool | None = None):
        self.base, self.n = base, len(seeds)
        # vmap on GPUs; on the CPU vmap's batched attention falls back to a slow per-member loop, and calling the
        # members in turn is faster (bench/eval_throughput.py --learner-steps)
        self.vectorized = gpu_paths(device) if vectorized is None else vectorized
        self.causal = is_causal(base)
        head_keys = head_param_names(base)
        params, buffers = stack_module_state([base] * len(seeds))
        for k in head_keys:
            for i, seed in enumerate(seeds):
                g = torch.Generator(device="cpu").manual_seed(seed)
                fresh = torch.randn(params[k][i].shape, generator=g) * 0.02 if k.endswith("weight") else 0.0
                params[k].data[i] = torch.as_tensor(fresh, dtype=params[k].dtype).to(device)
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self.buffers = buffers
        emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
        self.linear_keys = frozenset(f"{name}.{k}" for name, m in base.named_modules()
                                     if isinstance(m, torch.nn.Linear) for k, _ in m.named_parameters())
        self.vocab_key = next((k for k, p in base.named_parameters() if emb is not None and p is emb.weight), None)
        self.bind()

    def bind(self) -> None:
        """After ``params`` change: on the CPU, member i's parameters are leaves viewing row i of the stacked ones,
        grads included, so that backward accumulates into the stacked grads in place."""
        if not self.vectorized:
            for v in self.params.values():
                v.grad = torch.zeros_like(v)
            self.members = [{k: self._row(v, i) for k, v in self.params.items()} for i in range(self.n)]

    @staticmethod
    def _row(stacked: torch.Tensor, i: int) -> torch.Tensor:
        row = stacked.detach()[i].requires_grad_(True)
        row.grad = stacked.grad[i]
        return row

    def forward(self, inputs: dict[str, torch.Tensor], batched: bool = True) -> torch.Tensor:
        """Model inputs (``input_ids`` (.., B, T) or ``inputs_embeds`` (.., B, T, H), and a 0/1 ``attention_mask``
        (.., B, T)), with a leading member dimension N when ``batched``, else shared by all members → (N, B, C)."""

        def one(p, b, inp):
            kw = {**inp, "attention_mask": additive_mask(inp["attention_mask"], self.causal)}
            return functional_call(self.base, (p, b), (), kw).logits

        if self.vectorized:
            in_dims = (0, 0, 0 if batched else None)
            return vmap(one, in_dims=in_dims, randomness="different")(self.params, self.buffers, inputs)
        return torch.stack([self.member(i, {k: v[i] for k, v in inputs.items()} if batched else inputs)
                            for i in range(self.n)])

    def member(self, i: int, inputs: dict[str, torch.Tensor], params: dict | None = None) -> torch.Tensor:
        """Member ``i`` alone (the in-turn members of a CPU ensemble) on inputs (B, T[, H]) → logits (B, C); with
        ``params`` (:meth:`cast_linear`) in place of its own."""
        kw = {**inputs, "attention_mask": additive_mask(inputs["attention_mask"], self.causal)}
        params = self.members[i] if params is None else params
        return functional_call(self.base, (params, {k: v[i] for k, v in self.buffers.items()}), (), kw).logits

    def cast_linear(self, i: int, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """Member ``i``'s parameters with its linear layers' cast to ``dtype`` (a differentiable cast, made once for
        all the micro-batches of a step; autocast caches no cast of these row views and would cast them in every
        call)."""
        if dtype is None:
            return self.members[i]
        return {k: v.to(dtype) if k in self.linear_keys else v for k, v in self.members[i].items()}

    def logits(self, input_ids, attention_mask, batched: bool = True) -> torch.Tensor:
        """Token ids (N, B, T) when ``batched`` else (B, T) shared by all members → logits (N, B, C)."""
        return self.forward({"input_ids": input_ids, "attention_mask": attention_mask}, batched)


def batch_schedule(sizes: list[int], steps: int, batch: int, seeds: list[int]) -> np.ndarray:
    """Per member and step, indices into its set (epoch-wise shuffles), padded with -1 → (N, steps, B)."""
    b_max = min(batch, max(sizes))
    out = np.full((len(sizes), steps, b_max), -1, dtype=np.int64)
    for i, (n, seed) in enumerate(zip(sizes, seeds)):
        rng = np.random.default_rng(seed)
        b = min(batch, n)
        order = np.empty(0, dtype=np.int64)
        for s in range(steps):
            if len(order) < b:
                order = np.concatenate([order, rng.permutation(n)])
            out[i, s, :b], order = order[:b], order[b:]
    return out


# a learner call's fixed cost, in padded tokens: MiniLM-L6 in a one-thread worker, bf16 autocast, three random SST-2
# DPC-10 sets, 60 steps: 48 → 48.5 s, 80 → 46.5, 120 → 44.8, 160 → 45.4, 200 → 45.5, one batch → 52.3 (2026-12-07)
MICRO_BATCH_COST = 128


def micro_batches(lengths: list[int], call_cost: int = MICRO_BATCH_COST) -> list[tuple[int, int]]:
    """Cut rows sorted by length (ascending) into consecutive groups [start, end), each padded to its own longest,
    minimising padded tokens + ``call_cost`` per group (exact, by dynamic programming over the cut points). A batch
    of short texts and a few long ones then costs about its real tokens, not rows x the longest."""
    n = len(lengths)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end):
            cost = best[start] + call_cost + lengths[end - 1] * (end - start)
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], n
    while end:
        groups.append((cut[end], end))
        end = cut[end]
    return groups[::-1]


def member_step(ens: Ensemble, i: int, inputs: dict[str, torch.Tensor], targets: torch.Tensor, rows: torch.Tensor,
                lengths: torch.Tensor, precision: str, device) -> None:
    """Backward of member ``i``'s mean soft cross-entropy over its batch ``rows`` (indices into its set), computed
    in length-sorted micro-batches (:func:`micro_batches`), each cut to its own longest text: the same gradient as
    one padded batch (dropout draws aside), for the tokens the batch holds rather than rows x its longest."""
    order = rows[torch.argsort(lengths[rows])]
    sizes = lengths[order].tolist()
    loss = 0.0
    with autocast(device, precision):
        params = ens.cast_linear(i, autocast_dtype(device, precision))  # once per step, not per micro-batch
        for start, end in micro_batches(sizes):
            sel, t = order[start:end], sizes[end - 1]
            logits = ens.member(i, {k: v[i, sel, :t] for k, v in inputs.items()}, params)  # (b, C)
            loss = loss + (-(targets[i, sel] * torch.log_softmax(logits.float(), -1)).sum(-1)).sum()
    (loss / len(rows)).backward()  # outside autocast, as torch advises


def per_member_clip(params: dict[str, torch.Tensor], max_norm: float) -> None:
    norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.flatten(1), dim=1)
                                                  for p in params.values()]), dim=0)  # (N,)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in params.values():
        p.grad.mul_(coef.view(-1, *[1] * (p.grad.dim() - 1)).to(p.grad.dtype))


def decay_alone(cfg: EvalConfig) -> float:
    """What the protocol's AdamW does to a weight that never gets a gradient: its moments stay 0, so each step only
    decays it, by (1 - lr_t * weight_decay) at step t's learning rate."""
    return math.prod(1 - cfg.lr * linear_warmup_decay(s, cfg.steps, cfg.warmup_ratio) * cfg.weight_decay
                     for s in range(cfg.steps))


@contextlib.contextmanager
def used_rows(ens: Ensemble, inputs: dict[str, torch.Tensor], cfg: EvalConfig, frozen: frozenset[str]):
    """Train only the word-embedding rows the sets' texts use (their ids remapped into a (N, k, H) table); on exit,
    write them back and decay every other row by :func:`decay_alone`. The result is the full table's, as no other
    row gets a gradient (the clip's norm is the same too), without reading and writing the whole table (V x H: half
    of MiniLM-L6's weights) in every step's zeroing, clip and optimiser update. Yields the inputs to train on."""
    key = ens.vocab_key
    if key is None or key in frozen or "input_ids" not in inputs:
        yield inputs
        return
    emb, ids, full = ens.base.get_input_embeddings(), inputs["input_ids"], ens.params[key]
    pad = emb.padding_idx  # no gradient reaches it: it moves to its place in the small table
    used = torch.unique(ids if pad is None else torch.cat([ids.flatten(), ids.new_tensor([pad])]))
    ens.params[key] = full.detach()[:, used].clone().requires_grad_(True)
    ens.bind()
    if pad is not None:
        emb.padding_idx = int(torch.searchsorted(used, pad))
    try:
        yield {**inputs, "input_ids": torch.searchsorted(used, ids)}
    finally:
        emb.padding_idx = pad
        with torch.no_grad():
            full.mul_(decay_alone(cfg))
            full[:, used] = ens.params[key]
        ens.params[key] = full
        ens.bind()


def train_ensemble(ens: Ensemble, inputs: dict[str, torch.Tensor], targets: torch.Tensor, sizes: list[int],
                   seeds: list[int], cfg: EvalConfig, device, frozen: frozenset[str] = frozenset()) -> None:
    """The protocol's training loop: ``cfg.steps`` steps of every member on its own set, all at once.

    ``inputs`` {name: (N, max_n, ...)} (model inputs as :meth:`Ensemble.forward` takes them) and ``targets``
    (N, max_n, C): member i's set in its first ``sizes[i]`` rows (data shared by all members can be an
    ``expand``-ed view). Each member has its own data order (``seeds``), its own gradient clip, and the soft
    cross-entropy mean over its batch; the loss is the sum over members, which are independent. Parameters named in
    ``frozen`` stay out of the optimiser (no gradient reaches them, e.g. the word-embedding table under
    ``inputs_embeds``).
    """
    width = inputs["attention_mask"].shape[-1]
    with used_rows(ens, inputs, cfg, frozen) as rows_inputs, training_attention(ens.base, device, width):
        _train(ens, rows_inputs, targets, sizes, seeds, cfg, device, frozen)


def _train(ens: Ensemble, inputs: dict[str, torch.Tensor], targets: torch.Tensor, sizes: list[int],
           seeds: list[int], cfg: EvalConfig, device, frozen: frozenset[str]) -> None:
    trained = {k: v for k, v in ens.params.items() if k not in frozen}
    schedule = torch.as_tensor(batch_schedule(sizes, cfg.steps, cfg.batch_size, seeds), device=device)  # (N, S, B)
    opt = torch.optim.AdamW(list(trained.values()), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_warmup_decay(s, cfg.steps, cfg.warmup_ratio))
    rows = torch.arange(len(sizes), device=device)[:, None]
    lengths = inputs["attention_mask"].sum(-1)  # (N, max_n) tokens per text (right padding)
    for step in range(cfg.steps):
        idx = schedule[:, step]  # (N, B), -1 where a member's set is smaller than the batch
        opt.zero_grad(set_to_none=False)  # in place: the in-turn members' grads are views of these
        if not ens.vectorized:  # members in turn, each in length-sorted micro-batches
            for i in range(ens.n):
                member_step(ens, i, inputs, targets, idx[i][idx[i] >= 0], lengths[i], cfg.precision, device)
        else:
            valid = (idx >= 0).float()
            idx = idx.clamp(min=0)
            with autocast(device, cfg.precision):
                logits = ens.forward({k: v[rows, idx] for k, v in inputs.items()})  # (N, B, C)
            ce = -(targets[rows, idx] * torch.log_softmax(logits.float(), -1)).sum(-1)  # (N, B)
            loss = ((ce * valid).sum(1) / valid.sum(1)).sum()  # members independent: sum of their means
            loss.backward()
        per_member_clip(trained, cfg.clip)
        opt.step()
        sched.step()


@torch.no_grad()
def predict_ensemble(ens: Ensemble, tok, test: list[Example], cfg: EvalConfig, device) -> list[np.ndarray]:
    """Every member's predicted classes of ``test``, in chunks of texts of similar length (sorted by characters, so
    a chunk is padded to about its own length, not the split's longest) → N arrays of len(test)."""
    ens.base.eval()
    order = sorted(range(len(test)), key=lambda j: len(test[j].text) + len(test[j].text_pair or ""))
    preds = torch.empty((ens.n, len(test)), dtype=torch.long)
    for i in range(0, len(test), 256):
        chunk = order[i: i + 256]
        texts, pairs = pair_args([test[j] for j in chunk])  # a pair through the tokenizer's pair API
        enc = encode(tok, texts, cfg.max_length, device, pairs)
        with autocast(device, cfg.precision):
            preds[:, chunk] = ens.forward(enc, batched=False).argmax(-1).cpu()
    return list(preds.numpy())
