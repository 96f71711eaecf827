"""Speed of the distillation blocks: a naive Hugging Face baseline and dilm's implementation, in one run.

    python bench/distill_speed.py                                   # GPU: smollm2-135m + minilm-l6
    python bench/distill_speed.py --quick                           # CPU check: tiny generator, few steps

Blocks (baseline → dilm):
  * LM step: tokenise the batch's texts every step, fp32, unfused AdamW → pre-tokenised corpus, bf16 autocast,
    fused AdamW on CUDA.
  * generation: ``generate`` per class, batch 256, top-p 0.95, bf16 autocast (the README's 72 samples/s) →
    dilm's ``Sampler`` (all classes in one left-padded batch of up to 2048 rows, bf16 weights, no per-step host
    sync), in each decode mode: dynamic KV cache, static KV cache, and compiled (static + CUDA graph, GPU only).
  * matching step: ``torch.autograd.grad(create_graph=True)`` on the head parameters of the module, fp32 →
    ``torch.func`` gradients of the same parameters (the learner's body a constant, g_real without a graph).
  * matching step before/after (``matching_step_before_after``): dilm's previous ``torch.func`` step, whose
    backward pass also ran through the learner's body (``previous_class_gradient``) → the current one.
Prints each figure, the ratio and the peak GPU memory; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import functools
import random
import time

import torch
from record import write  # bench/, beside this script
from torch.func import functional_call, grad

from dilm.device import autocast, pick_device
from dilm.generator import (
    TokenizedCorpus,
    generation_loss,
    lm_loss,
    make_sampler,
    pad_samples,
    prompt,
    render,
    sample_class,
)
from dilm.matching import class_gradient, match_loss, matched_params, sample_weights
from dilm.models import head_param_names, load_model, load_tokenizer
from dilm.sampling import SamplingSpec
from dilm.tasks import load_task
from dilm.text import encode


def timed(fn, reps: int, device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def lm_blocks(gen_name, texts, labels, names, batch, device, reps):
    tok = load_tokenizer(gen_name)
    rng = random.Random(0)

    model = load_model(gen_name, "causal-lm", device=device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def naive():
        idx = [rng.randrange(len(texts)) for _ in range(batch)]
        enc = tok([render(names[labels[i]], texts[i], None, tok.eos_token) for i in idx], padding=True,
                  truncation=True, max_length=64, return_tensors="pt", padding_side="right").to(device)
        out = model(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100))
        opt.zero_grad()
        out.loss.backward()
        opt.step()

    from dilm.tasks import Example

    corpus = TokenizedCorpus.build(tok, [Example(t, lab) for t, lab in zip(texts, labels)], names, 64)
    fast_opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def ours():
        loss = lm_loss(model, corpus.batch(batch, rng, device), device)
        fast_opt.zero_grad(set_to_none=True)
        loss.backward()
        fast_opt.step()

    return timed(naive, reps, device), timed(ours, reps, device), model, tok


def generation_blocks(model, tok, names, n, new_tokens, device, batch, modes):
    """Samples/s of the README baseline (``generate``, batch 256, top-p 0.95, bf16 autocast over fp32 weights)
    and of dilm's :class:`Sampler` in each mode on the same rows; the compile time is reported apart."""
    model.eval()
    prompts = [tok(prompt(name), add_special_tokens=False)["input_ids"] for name in names]
    rows = [p for p in prompts for _ in range(n)]

    def naive():
        for name in names:
            for start in range(0, n, 256):
                enc = tok([prompt(name)] * min(256, n - start), return_tensors="pt").to(device)
                with autocast(device):
                    model.generate(**enc, do_sample=True, top_p=0.95, max_new_tokens=new_tokens,
                                   pad_token_id=tok.pad_token_id)

    out = {"baseline": len(rows) / timed(naive, 1, device)}
    for mode in modes:
        sampler = make_sampler(model, tok, device, SamplingSpec(max_new_tokens=new_tokens, batch_size=batch,
                                                                mode=mode), names)
        t = time.perf_counter()
        sampler.sample(rows[:batch], seed=1)  # warm-up (and, for "compiled", the compilation)
        out[f"{mode}_warmup_s"] = time.perf_counter() - t
        out[mode] = len(rows) / timed(functools.partial(sampler.sample, rows, seed=2), 1, device)
    best = max(modes, key=lambda m: out[m])
    out.update(dilm=out[best], best_mode=best, ratio=out[best] / out["baseline"])
    return out


def matching_blocks(gen, gtok, learner_name, real_by_class, names, syn_per_class, device, reps):
    """One matching step over all classes (the README baseline: 2 classes, 200 real + 64 synthetic each)."""
    learner = load_model(learner_name, "classifier", len(names), device).eval()
    ltok = load_tokenizer(learner_name)
    per_class = []
    for c, name in enumerate(names):
        samples = sample_class(gen, gtok, name, syn_per_class, device,
                               SamplingSpec(max_new_tokens=24, batch_size=syn_per_class, max_rounds=1))
        per_class.append((c, pad_samples(samples, gtok.pad_token_id, device),
                          encode(ltok, real_by_class[c], 128, device), encode(ltok, [s.text for s in samples], 128,
                                                                                     device)))
    gen.train()

    def naive():
        for c, gen_batch, real, syn in per_class:
            naive_match_loss(gen, learner, c, gen_batch, real, syn, device).backward()
        gen.zero_grad(set_to_none=True)
        learner.zero_grad(set_to_none=True)

    params = matched_params(learner)

    def before():  # dilm's previous step: the learner's body entered as its own parameters (requiring grad)
        for c, (ids, am, tm), real, syn in per_class:
            g_real = {k: v.detach() for k, v in previous_class_gradient(learner, params, real, c).items()}
            w = sample_weights(generation_loss(gen, ids, am, tm, device), 1.0)
            match_loss(g_real, previous_class_gradient(learner, params, syn, c, weights=w)).backward()
        gen.zero_grad(set_to_none=True)
        learner.zero_grad(set_to_none=True)

    def ours():  # now: the body passed detached, g_real computed without a graph
        for c, (ids, am, tm), real, syn in per_class:
            with torch.no_grad():
                g_real = class_gradient(learner, params, real, c)
            w = sample_weights(generation_loss(gen, ids, am, tm, device), 1.0)
            match_loss(g_real, class_gradient(learner, params, syn, c, weights=w)).backward()
        gen.zero_grad(set_to_none=True)

    return timed(naive, reps, device), timed(before, reps, device), timed(ours, reps, device)


def naive_match_loss(gen, learner, label: int, gen_batch: tuple, real: dict, syn: dict, device) -> torch.Tensor:
    """The README baseline's matching loss of one class: the head's gradients by ``torch.autograd.grad`` through the
    whole learner (``create_graph`` for the synthetic side), weights softmax(−generation loss), 1 − cosine."""
    head = [p for k, p in learner.named_parameters() if k in head_param_names(learner)]
    y_real = torch.full((len(real["input_ids"]),), label, device=device)
    g_real = torch.autograd.grad(torch.nn.functional.cross_entropy(learner(**real).logits, y_real), head)
    w = torch.softmax(-generation_loss(gen, *gen_batch, device), 0)
    y_syn = torch.full((len(syn["input_ids"]),), label, device=device)
    ce = torch.nn.functional.cross_entropy(learner(**syn).logits, y_syn, reduction="none")
    g_syn = torch.autograd.grad((w * ce).sum(), head, create_graph=True)
    return 1 - torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in g_real]),
                                                     torch.cat([g.flatten() for g in g_syn]), dim=0)


def previous_class_gradient(learner, params, inputs, label, weights=None):
    """``dilm.matching.class_gradient`` as it was before the learner's body became a constant: only ``params``
    replaced, the other parameters (requiring grad) taken from the module, so the generator's backward pass
    also runs through the body and fills its ``.grad``."""

    def loss_fn(p):
        logits = functional_call(learner, p, (), inputs).logits
        ce = torch.nn.functional.cross_entropy(logits.float(), torch.full((logits.shape[0],), label,
                                                                          device=logits.device), reduction="none")
        return ce.mean() if weights is None else (weights * ce).sum()

    return grad(loss_fn)(params)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="tiny models, CPU scale")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    device = pick_device("auto")
    # --quick: a tiny generator, but the real (packaged) learner: with tiny-bert the learner's share of the
    # matching step is too small for the before/after comparison to show anything
    gen_name, learner_name = ("tiny-llama", "minilm-l6") if a.quick else ("smollm2-135m", "minilm-l6")
    batch, reps, n_gen, new_tokens, n_real, n_syn = (8, 3, 32, 16, 32, 8) if a.quick else (64, 20, 1024, 48, 200, 64)
    gen_batch = 64 if a.quick else 2048
    task = load_task("sst2")
    texts, labels = [e.text for e in task.train], [e.label for e in task.train]
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "quick": a.quick}
    naive_lm, ours_lm, gen, tok = lm_blocks(gen_name, texts, labels, task.label_names, batch, device, reps)
    out["lm_steps_per_s"] = {"baseline": 1 / naive_lm, "dilm": 1 / ours_lm, "ratio": naive_lm / ours_lm}
    modes = ("dynamic", "static") if device.type == "cpu" else ("dynamic", "static", "compiled")
    out["generation_samples_per_s"] = generation_blocks(gen, tok, task.label_names, n_gen, new_tokens, device,
                                                        gen_batch, modes)
    real_by_class = [[t for t, lab in zip(texts, labels) if lab == c][:n_real] for c in range(len(task.label_names))]
    naive_m, before_m, ours_m = matching_blocks(gen, tok, learner_name, real_by_class, task.label_names, n_syn,
                                                device, reps)
    out["matching_steps_per_s"] = {"baseline": 1 / naive_m, "dilm": 1 / ours_m, "ratio": naive_m / ours_m}
    out["matching_step_before_after"] = {"baseline": 1 / before_m, "dilm": 1 / ours_m, "ratio": before_m / ours_m}
    if device.type == "cuda":
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    for k, v in out.items():
        if isinstance(v, dict):
            print(f"{k:>32}: baseline {v['baseline']:.2f}  dilm {v['dilm']:.2f}  ratio {v['ratio']:.2f}x")
    print(f"device: {out['device']}" + (f", peak GPU memory {out['peak_gpu_mem_gib']:.1f} GiB"
                                       if "peak_gpu_mem_gib" in out else ""))
    if a.json:
        write(a.json, out)


if __name__ == "__main__":
    main()
