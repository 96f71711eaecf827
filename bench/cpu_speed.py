"""Speed of the generator's sampling, LM step and matching step (and of a probe evaluation), against plain Hugging
Face, in one run on the packaged smollm2-135m (or an LM-stage checkpoint of it: ``--generator``) and minilm-l6: on the
CPU at the demo preset's shapes, or (``--gpu``) on the GPU at the gpu preset's.

    python bench/cpu_speed.py --quick --json out.json     # a few minutes on 2 cores
    python bench/cpu_speed.py --compile                   # more rows and repetitions, plus the compiled sampler
    python bench/cpu_speed.py --quick --generator runs/x/lm   # sampling from a fine-tuned generator
    python bench/cpu_speed.py --quick --blocks sampling --modes dynamic,static,compiled   # every decode mode
    python bench/cpu_speed.py --gpu --json speed.json     # GPU: 2,048 rows, every decode mode, peak GPU memory

``--gpu`` answers what ``bench/distill_speed.py`` did (its ``--quick`` CPU check is ``--quick`` here): the same
blocks on CUDA at the gpu preset's batches (the sampler's 2,048 rows, top-p 0.95, 48 new tokens; ``generate`` 256 rows
a call, also under bf16 autocast; the LM stage's batch of 64; matching 200 real and 64 synthetic texts a class), the
thread variants left out, each block's peak GPU memory beside its peak RSS.

Each block times its baseline and candidates in interleaved repetitions (baseline, candidate 1, candidate 2, …,
baseline, …) and takes medians, so the load of other processes on a shared machine falls on all of them alike;
every figure is printed with its ratio to the block's baseline, and the block's peak RSS (and GPU memory).

* sampling (samples/s; SST-2 prompts of both classes, ``--new-tokens``, ``--top-p``): ``model.generate`` (fp32,
  do_sample, top_p, no top-k, ``--batch`` rows a call) → dilm's sampler (``--sampler-batch`` rows a batch) in each
  mode (dynamic; static unless ``--quick``; compiled with ``--compile`` or ``--gpu``) at fp32, and at bf16 where it is
  native (:func:`dilm.device.bf16_supported`; elsewhere, with ``--bf16``, the dynamic sampler at emulated bf16);
  ``auto`` names the precision that ``make_sampler`` picks here;
* LM step (steps/s; the preset's batch of SST-2 examples, the demo's 8, AdamW, clipping as the LM stage): a padded
  batch through the model's own loss, fp32, one thread → ``lm_loss`` (packed) and/or :func:`dilm.device.cpu_threads`
  threads;
  the same with a fused AdamW (one pass over the weights, not several); that at the default ``lm_precision`` (bf16
  autocast on a CPU with native bf16 and on a bf16 GPU); and the LM stage's own step (that, with its attention kernel:
  :func:`dilm.device.training_attention`); with ``--curve-steps``, its loss curve against fp32's (two seeds
  each);
* matching step (steps/s; the preset's real and synthetic texts a class, the demo's 8 and 4, the generator's backward
  and AdamW step included): the head's gradients by ``torch.autograd.grad(create_graph=True)`` through the whole
  learner, fp32, one thread → :func:`dilm.matching.class_gradient` at one thread and at
  :func:`dilm.device.cpu_threads` threads;
* probe evaluation (evaluations/s of ``minilm-probe`` on a 20-text set, test embeddings cached): one thread →
  :func:`dilm.device.cpu_threads` threads.

Checks printed beside the speeds: the shortlisted top-p draws the same tokens as the full sort; the mean NLL of
fixed SST-2 texts under the bf16 copy against fp32 (and that difference against the spread over texts); a few
bf16 and fp32 samples of one prompt, to read.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import random
import re
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from record import write  # bench/, beside this script

from dilm.device import (
    autocast,
    autocast_dtype,
    bf16_supported,
    cpu_has_bf16,
    cpu_threads,
    inference_dtype,
    pick_device,
    training_attention,
)
from dilm.distill.config import DistillConfig
from dilm.generator import (
    Sample,
    TokenizedCorpus,
    generation_loss,
    lm_loss,
    make_sampler,
    pad_samples,
    prompt,
    resolve_template,
)
from dilm.matching import class_gradient, match_loss, matched_params, sample_weights
from dilm.models import head_param_names, load_model, load_tokenizer
from dilm.probe import fit_logreg, predict, sentence_embeddings
from dilm.sampling import Sampler, SamplingSpec, bf16_params_copy
from dilm.tasks import length_limit, load_task
from dilm.text import encode

# (rows sampled, repetitions, LM steps, matching steps, probe evaluations) a repetition, per scale
SCALES = {"quick": (128, 3, 2, 2, 5), "cpu": (512, 5, 4, 4, 10), "gpu": (2048, 5, 10, 4, 10)}
# the shapes not in a preset, per device: generate's rows a call, new tokens a sample
SHAPES = {"cpu": {"batch": 64, "new_tokens": 32}, "gpu": {"batch": 256, "new_tokens": 48}}


def reset_peak_memory(device: torch.device) -> None:
    """Start a block's peak-memory window: RSS (Linux: writing 5 to clear_refs resets VmHWM to the current RSS) and,
    on a GPU, its allocator's peak."""
    with contextlib.suppress(OSError):  # elsewhere the peak is the process's since it started
        Path("/proc/self/clear_refs").write_text("5")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_rss_mib() -> float:
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (its clock stops when the work is done, not when it is queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(candidates: dict[str, tuple[int, Callable[[int], object]]], reps: int, device: torch.device
                ) -> dict[str, tuple[float, float]]:
    """{name: (torch threads, fn(rep))} → {name: (median wall seconds, median process CPU seconds)}; repetition r
    calls every candidate in turn."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in candidates}
    for r in range(reps):
        for name, (threads, fn) in candidates.items():
            torch.set_num_threads(threads)
            synchronize(device)
            t, c = time.perf_counter(), time.process_time()
            fn(r)
            synchronize(device)
            times[name].append((time.perf_counter() - t, time.process_time() - c))
        print(f"  rep {r}: " + ", ".join(f"{k} {v[-1][0]:.1f}s" for k, v in times.items()), flush=True)
    return {name: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for name, v in times.items()}


def block(a, name: str, unit: str, work: float, candidates: dict, extra: dict | None = None) -> dict:
    """Times ``candidates`` (the first is the baseline) on ``a.device`` → per candidate: ``unit`` per second and its
    ratio to the baseline's (wall clock), CPU seconds per unit and that ratio (the work done, whatever the load:
    comparable between candidates of one thread count); the block's peak RSS and peak GPU memory."""
    print(f"{name}:", flush=True)
    reset_peak_memory(a.device)
    med = interleaved(candidates, a.reps, a.device)
    wall0, cpu0 = med[next(iter(candidates))]
    rows = {k: {unit: work / wall, "ratio": wall0 / wall, "cpu_s_per_unit": cpu / work, "cpu_ratio": cpu0 / cpu,
                "threads": candidates[k][0]} for k, (wall, cpu) in med.items()}
    peak = {"peak_gpu_mem_gib": torch.cuda.max_memory_allocated(a.device) / 2**30} if a.device.type == "cuda" else {}
    return {"baseline": next(iter(candidates)), "candidates": rows, "peak_rss_mib": peak_rss_mib(), **peak,
            **(extra or {})}


def thread_label(threads: int) -> str:
    return f"{threads} thread" + ("s" if threads > 1 else "")


def sampling_block(a, gen, tok, names, template, threads: int) -> dict:
    dev = a.device
    prompts = [tok(prompt(n, template), add_special_tokens=False)["input_ids"] for n in names]
    rows = [prompts[i % len(prompts)] for i in range(a.rows)]

    @torch.no_grad()
    def hf_generate(rep: int, precision: str = "fp32") -> None:
        torch.manual_seed(rep)
        for start in range(0, len(rows), a.batch):
            chunk = [prompt(names[i % len(names)], template) for i in range(start, min(start + a.batch, len(rows)))]
            enc = tok(chunk, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt").to(dev)
            with autocast(dev, precision):
                gen.generate(**enc, do_sample=True, top_p=a.top_p, top_k=0, max_new_tokens=a.new_tokens,
                             pad_token_id=tok.pad_token_id)

    candidates, warmup = {"generate fp32": (threads, hf_generate)}, {}
    if dev.type == "cuda":  # plain Hugging Face's own mixed precision: bf16 autocast over fp32 weights
        candidates["generate bf16 autocast"] = (threads, functools.partial(hf_generate, precision="bf16"))
    modes = tuple(a.modes.split(",")) if a.modes else (
        ("dynamic",) + (() if a.quick else ("static",)) + (("compiled",) if a.compile else ()))
    native = bf16_supported(dev)
    precisions = ("fp32", "bf16") if native else ("fp32",)
    runs = [(m, p) for p in precisions for m in modes] + ([("dynamic", "bf16")] if a.bf16 and not native else [])
    for mode, precision in runs:
        spec = SamplingSpec(template=template, max_new_tokens=a.new_tokens, top_p=a.top_p, batch_size=a.sampler_batch,
                            mode=mode, precision=precision)
        sampler = make_sampler(gen, tok, dev, spec, names)
        t = time.perf_counter()
        shapes = {min(a.sampler_batch, a.rows), a.rows % a.sampler_batch} - {0} if mode == "compiled" else {8}
        for n in sorted(shapes):  # compiled: every batch shape it will see is compiled here
            sampler.sample(rows[:n], seed=0)
        synchronize(dev)
        warmup[f"{mode} {precision}"] = time.perf_counter() - t
        candidates[f"{mode} {precision}"] = (threads, lambda rep, s=sampler: s.sample(rows, seed=rep))
    auto = "bf16" if inference_dtype(dev) == torch.bfloat16 else "fp32"
    return block(a, "sampling", "samples_per_s", len(rows), candidates,
                 {"warmup_s": warmup, "auto_precision": auto, "cpu_has_bf16": cpu_has_bf16(), "native_bf16": native})


def lm_block(a, tok, names, template, task, threads: int) -> dict:
    dev = a.device
    corpus = TokenizedCorpus.build(tok, task.train, names, template=template)
    corpus = corpus.truncated(length_limit([len(s) for s in corpus.sequences], 0.99, 128))  # the demo's limit
    model = load_model("smollm2-135m", "causal-lm", device=dev).train()
    unfused = torch.optim.AdamW(model.parameters(), lr=1e-5)  # plain PyTorch's default optimiser
    fused = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # the LM stage's (lm_optimizer)

    def steps(loss_fn, opt, rep: int) -> None:
        rng = random.Random(rep)  # every candidate trains on the same batches in a repetition
        for _ in range(a.lm_steps):
            loss = loss_fn(corpus.batch(a.lm_batch, rng, dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

    padded = functools.partial(steps, lambda b: model(**b).loss, unfused)
    packed = functools.partial(steps, lambda b: lm_loss(model, b, dev, "fp32"), unfused)
    n = thread_label(threads)
    if dev.type == "cpu":
        candidates = {"padded fp32, 1 thread": (1, padded), "packed fp32, 1 thread": (1, packed)}
        if threads > 1:
            candidates |= {f"padded fp32, {n}": (threads, padded), f"packed fp32, {n}": (threads, packed)}
    else:  # threads do not move a GPU's step
        n, candidates = dev.type, {"padded fp32": (threads, padded), "packed fp32": (threads, packed)}
    candidates[f"packed, {n}, fused AdamW"] = (threads, functools.partial(
        steps, lambda b: lm_loss(model, b, dev, "fp32"), fused))
    auto = "bf16" if autocast_dtype(dev, "auto") == torch.bfloat16 else "fp32"
    bf16_sdpa = functools.partial(steps, lambda b: lm_loss(model, b, dev, "auto"), fused)
    if dev.type == "cpu":  # on a GPU the stage's kernel is SDPA: the next candidate
        candidates[f"packed {auto}, {n}, fused AdamW, SDPA"] = (threads, bf16_sdpa)

    width = corpus.width  # once, outside the timed steps

    def dilm_step(rep: int) -> None:  # the LM stage's step: its lm_precision (auto) and its attention kernel
        with training_attention(model, dev, width):
            bf16_sdpa(rep)

    dilm = f"dilm: packed {auto}, {n}, fused AdamW, its attention"
    candidates[dilm] = (threads, dilm_step)
    extra = {"dilm": dilm, "auto_precision": auto}
    if a.curve_steps:
        extra["curves"] = lm_curves(a, corpus)
    return block(a, "LM step", "steps_per_s", a.lm_steps, candidates, extra)


def lm_curves(a, corpus: TokenizedCorpus) -> dict:
    """The LM stage's loss at its default precision against fp32: ``--curve-steps`` steps from the packaged model
    at the LM stage's lr and schedule, two batch orders (seeds) each; the final loss (mean of the last ten steps) of
    auto against fp32 on the same batches, beside the spread between fp32's two seeds."""
    from dilm.distill.lm_stage import LMStageConfig, lm_optimizer

    dev = a.device
    lm = LMStageConfig(generator="smollm2-135m", lm_steps=a.curve_steps, lm_lr=1e-4, lm_weight_decay=0.01,
                       lm_batch_size=a.lm_batch, lm_precision="auto", max_length=0, length_quantile=0.99,
                       length_cap=128, seed=0)
    final = {}
    for precision in ("fp32", "auto"):
        for seed in (0, 1):
            model = load_model("smollm2-135m", "causal-lm", device=dev).train()
            opt, sched = lm_optimizer(lm, model, dev)
            rng, losses = random.Random(seed), []
            kernel = training_attention(model, dev, corpus.width) if precision == "auto" else contextlib.nullcontext()
            with kernel:  # auto: the LM stage's step (its precision and attention kernel); fp32: SDPA as before
                for _ in range(a.curve_steps):
                    loss = lm_loss(model, corpus.batch(a.lm_batch, rng, dev), dev, precision)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    sched.step()
                    losses.append(loss.item())
            final[f"{precision} seed {seed}"] = statistics.fmean(losses[-10:])
            print(f"  curve {precision} seed {seed}: final loss {final[f'{precision} seed {seed}']:.4f}", flush=True)
    return {"steps": a.curve_steps, "final_loss": final,
            "auto_minus_fp32": [final[f"auto seed {s}"] - final[f"fp32 seed {s}"] for s in (0, 1)],
            "fp32_seed_spread": abs(final["fp32 seed 0"] - final["fp32 seed 1"])}


def autograd_match_loss(gen, learner, label: int, gen_batch: tuple, real: dict, syn: dict, device) -> torch.Tensor:
    """The baseline's matching loss of one class, as plain PyTorch writes it: the head's gradients by
    ``torch.autograd.grad`` through the whole learner (``create_graph`` for the synthetic side), weights
    softmax(−generation loss), 1 − cosine."""
    head = [p for k, p in learner.named_parameters() if k in head_param_names(learner)]
    y_real = torch.full((len(real["input_ids"]),), label, device=device)
    g_real = torch.autograd.grad(torch.nn.functional.cross_entropy(learner(**real).logits, y_real), head)
    w = torch.softmax(-generation_loss(gen, *gen_batch, device), 0)
    y_syn = torch.full((len(syn["input_ids"]),), label, device=device)
    ce = torch.nn.functional.cross_entropy(learner(**syn).logits, y_syn, reduction="none")
    g_syn = torch.autograd.grad((w * ce).sum(), head, create_graph=True)
    return 1 - torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in g_real]),
                                                     torch.cat([g.flatten() for g in g_syn]), dim=0)


def matching_block(a, tok, names, template, task, threads: int) -> dict:
    """One generator step of the matching stage at the preset's shape (``--real-per-class`` real and
    ``--syn-per-class`` synthetic texts a class, SST-2 training texts rendered as generator samples), backward,
    clipping and the generator's AdamW step included. Baseline: the head's gradients by ``torch.autograd.grad``
    with ``create_graph`` through the whole learner (its body's parameters requiring grad), fp32, 1 thread → dilm's
    :func:`dilm.matching.class_gradient` (``torch.func`` over the head; the body a constant; g_real without a
    graph) at 1 thread and at ``threads``."""
    dev = a.device
    gen = load_model("smollm2-135m", "causal-lm", device=dev).train()
    learner = load_model("minilm-l6", "classifier", len(names), dev).eval()
    ltok = load_tokenizer("minilm-l6")
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-5)
    rng = random.Random(0)
    classes = []
    for c, name in enumerate(names):
        group = [e for e in task.train if e.label == c]
        texts = [e.text for e in rng.sample(group, a.real_per_class + a.syn_per_class)]
        head = tok(prompt(name, template), add_special_tokens=False)["input_ids"]
        syn = [Sample(t, None, head + tok(" " + t, add_special_tokens=False)["input_ids"][:64] + [tok.eos_token_id],
                      len(head)) for t in texts[a.real_per_class:]]
        classes.append((c, pad_samples(syn, tok.pad_token_id, dev), encode(ltok, texts[:a.real_per_class], 128, dev),
                        encode(ltok, [s.text for s in syn], 128, dev)))
    params = matched_params(learner)

    def naive_loss(c, gen_batch, real, syn) -> torch.Tensor:
        return autograd_match_loss(gen, learner, c, gen_batch, real, syn, dev)

    def dilm_loss(c, gen_batch, real, syn) -> torch.Tensor:
        with torch.no_grad():
            g_real = class_gradient(learner, params, real, c)
        w = sample_weights(generation_loss(gen, *gen_batch, dev), 1.0)
        return match_loss(g_real, class_gradient(learner, params, syn, c, weights=w))

    def steps(loss_fn, rep: int) -> None:
        for _ in range(a.match_steps):
            opt.zero_grad(set_to_none=True)
            for c, gen_batch, real, syn in classes:
                (loss_fn(c, gen_batch, real, syn) / len(classes)).backward()
            learner.zero_grad(set_to_none=True)
            torch.nn.utils.clip_grad_norm_(gen.parameters(), 1.0)
            opt.step()

    if dev.type == "cpu":
        n = thread_label(threads)
        candidates = {"autograd.grad, 1 thread": (1, functools.partial(steps, naive_loss)),
                      "class_gradient, 1 thread": (1, functools.partial(steps, dilm_loss))}
        if threads > 1:
            candidates[f"class_gradient, {n}"] = (threads, functools.partial(steps, dilm_loss))
        dilm = f"class_gradient, {n}"
    else:
        dilm = f"class_gradient, {dev.type}"
        candidates = {f"autograd.grad, {dev.type}": (threads, functools.partial(steps, naive_loss)),
                      dilm: (threads, functools.partial(steps, dilm_loss))}
    return block(a, "matching step", "steps_per_s", a.match_steps, candidates,
                 {"dilm": dilm, "real_per_class": a.real_per_class, "syn_per_class": a.syn_per_class})


def probe_block(a, task, threads: int) -> dict:
    dev = a.device
    encoder = load_model("minilm-l6", "base", device=dev).eval()
    test = sentence_embeddings([e.text for e in task.test[:500]], "minilm-l6", dev, encoder)
    by_class = [[e for e in task.train if e.label == c][:10] for c in range(len(task.label_names))]
    texts = [e.text for group in by_class for e in group]
    targets = np.eye(len(by_class))[[e.label for group in by_class for e in group]]

    def evaluations(rep: int) -> None:
        for _ in range(a.probe_evals):
            predict(fit_logreg(sentence_embeddings(texts, "minilm-l6", dev, encoder), targets), test)

    if dev.type != "cpu":
        candidates = {dev.type: (threads, evaluations)}
    else:
        candidates = {"1 thread": (1, evaluations)} | ({f"{threads} threads": (threads, evaluations)} if threads > 1
                                                        else {})
    return block(a, "probe evaluation", "evaluations_per_s", a.probe_evals, candidates)


@torch.no_grad()
def quality_checks(a, gen, tok, names, template, task) -> dict:
    """Shortlist = full sort; NLL of fixed texts, fp32 vs the bf16 copy; a few samples of each to read."""
    dev = a.device
    prompts = [tok(prompt(n, template), add_special_tokens=False)["input_ids"] for n in names]
    rows = [prompts[i % len(prompts)] for i in range(a.batch)]
    spec = SamplingSpec(template=template, max_new_tokens=a.new_tokens, top_p=a.top_p, batch_size=a.batch,
                        precision="fp32")
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    same = Sampler(gen, dev, spec, **kw, shortlist=0).sample(rows, seed=5) == Sampler(gen, dev, spec, **kw).sample(
        rows, seed=5)
    fixed = task.test[:64]
    texts, label = [e.text for e in fixed], [names[e.label] for e in fixed]
    enc = tok([prompt(n, template) + " " + t + tok.eos_token for n, t in zip(label, texts)], add_special_tokens=False,
              padding=True, padding_side="right", return_tensors="pt").to(dev)
    targets = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    nll = {}
    for precision, model in (("fp32", gen), ("bf16", bf16_params_copy(gen))):
        logits = model(**enc).logits[:, :-1].float()
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets[:, 1:], reduction="none")
        mask = (targets[:, 1:] != -100).float()
        nll[precision] = ((per_token * mask).sum(1) / mask.sum(1)).tolist()  # per text
    diff = [b - f for f, b in zip(nll["fp32"], nll["bf16"])]
    shown = {}
    for precision in ("fp32", "bf16"):
        sampler = make_sampler(gen, tok, dev, dataclasses.replace(spec, batch_size=8, precision=precision), names)
        shown[precision] = [tok.decode(r, skip_special_tokens=True).strip()
                            for r in sampler.sample([prompts[1]] * 4, seed=11)]
    return {"shortlist_equals_full_sort": same, "nll_fp32": statistics.fmean(nll["fp32"]),
            "nll_bf16": statistics.fmean(nll["bf16"]), "nll_diff_mean": statistics.fmean(diff),
            "nll_diff_sd": statistics.stdev(diff), "nll_sd_over_texts": statistics.stdev(nll["fp32"]),
            "prompt": prompt(names[1], template), "samples": shown}


def report(out: dict) -> None:
    for key in ("sampling", "lm_step", "matching", "probe"):
        if key not in out:
            continue
        b = out[key]
        gpu = f", peak GPU memory {b['peak_gpu_mem_gib']:.1f} GiB" if "peak_gpu_mem_gib" in b else ""
        print(f"\n{key} (baseline: {b['baseline']}; peak RSS {b['peak_rss_mib']:.0f} MiB{gpu})")
        for name, row in b["candidates"].items():
            unit = next(k for k in row if k.endswith("_per_s"))
            print(f"  {name:28s} {row[unit]:8.3f} {unit}  {row['ratio']:5.2f}x   CPU s/unit "
                  f"{row['cpu_s_per_unit']:7.3f} {row['cpu_ratio']:5.2f}x  ({row['threads']} threads)")
    if curves := out.get("lm_step", {}).get("curves"):
        finals = ", ".join(f"{k} {v:.4f}" for k, v in curves["final_loss"].items())
        diffs = ", ".join(f"{d:+.4f}" for d in curves["auto_minus_fp32"])
        print(f"\nLM stage, {curves['steps']} steps, final loss (mean of the last 10): {finals}; auto - fp32 on the "
              f"same batches: {diffs}; fp32 seed-to-seed spread {curves['fp32_seed_spread']:.4f}")
    if "quality" not in out:
        return
    q = out["quality"]
    print(f"\nauto precision here: {out['sampling']['auto_precision']} (native bf16: {out['sampling']['native_bf16']})"
          f"\nshortlisted top-p draws the full sort's tokens: {q['shortlist_equals_full_sort']}"
          f"\nNLL/token of 64 SST-2 texts: fp32 {q['nll_fp32']:.4f}, bf16 {q['nll_bf16']:.4f} (bf16 - fp32 "
          f"{q['nll_diff_mean']:+.4f} ± {q['nll_diff_sd']:.4f} per text; texts spread {q['nll_sd_over_texts']:.3f})"
          f"\nsamples of {q['prompt']!r}:")
    for precision, texts in q["samples"].items():
        for t in texts:
            print(f"  {precision}: {t}")


def arguments() -> argparse.Namespace:
    """The command line; the shapes it leaves unset come from the scale's preset (demo on the CPU, gpu with --gpu)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="128 rows, 3 repetitions, the dynamic sampler only, 2 LM "
                                                         "steps each: a few minutes")
    p.add_argument("--gpu", action="store_true", help="on the GPU at the gpu preset's shapes, every decode mode (what "
                                                       "bench/distill_speed.py measured)")
    p.add_argument("--compile", action="store_true", help="also the compiled sampler (minutes of compilation a shape)")
    p.add_argument("--modes", default="", help="the sampler's decode modes to time, comma-separated (default: dynamic; "
                                               "static too unless --quick; compiled with --compile or --gpu)")
    p.add_argument("--bf16", action="store_true", help="also the dynamic bf16 sampler where bf16 is emulated "
                                                        "(no native bf16; slow)")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--threads", type=int, default=0, help="torch threads of the sampling block and of dilm's "
                                                           "candidates (0 = dilm.device.cpu_threads())")
    p.add_argument("--blocks", default="sampling,lm,matching,probe", help="which blocks to run (comma-separated)")
    p.add_argument("--generator", default="smollm2-135m", help="the sampling block's generator: smollm2-135m or an "
                                                             "LM-stage checkpoint of it (texts that end at EOS)")
    p.add_argument("--batch", type=int, default=None, help="generate's rows per call (64; 256 with --gpu)")
    p.add_argument("--sampler-batch", type=int, default=None, help="dilm's sampler rows per batch (the preset's "
                                                                   "gen_batch_size: the largest that helps)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens a sample (32; 48 with --gpu)")
    p.add_argument("--top-p", type=float, default=None, help="the preset's")
    p.add_argument("--lm-batch", type=int, default=None, help="the preset's lm_batch_size")
    p.add_argument("--curve-steps", type=int, default=0, help="also the LM stage's loss curve at its default "
                                                               "precision against fp32, this many steps (0: skip)")
    p.add_argument("--real-per-class", type=int, default=None, help="the matching block's real texts a class (the "
                                                                     "preset's)")
    p.add_argument("--syn-per-class", type=int, default=None, help="its synthetic texts a class (the preset's)")
    a = p.parse_args()
    scale = "gpu" if a.gpu else "quick" if a.quick else "cpu"
    a.rows, a.reps, a.lm_steps, a.match_steps, a.probe_evals = SCALES[scale]
    a.compile = a.compile or a.gpu
    a.device = pick_device("cuda" if a.gpu else "cpu")
    preset = DistillConfig.from_preset("gpu" if a.gpu else "demo")
    given = {"batch": a.batch, "new_tokens": a.new_tokens, "sampler_batch": a.sampler_batch, "top_p": a.top_p,
             "lm_batch": a.lm_batch, "real_per_class": a.real_per_class, "syn_per_class": a.syn_per_class}
    defaults = {**SHAPES["gpu" if a.gpu else "cpu"], "sampler_batch": preset.gen_batch_size, "top_p": preset.top_p,
                "lm_batch": preset.lm_batch_size, "real_per_class": preset.real_per_class,
                "syn_per_class": preset.syn_per_class}
    for k, v in given.items():
        setattr(a, k, defaults[k] if v is None else v)
    return a


def main() -> None:
    a = arguments()
    threads = a.threads or cpu_threads()
    blocks = a.blocks.split(",")
    torch.manual_seed(0)
    task = load_task("sst2")
    template, names = resolve_template("task", "sst2"), task.label_names
    tok = load_tokenizer("smollm2-135m")
    out = {"threads": threads, "cpu_threads": cpu_threads(), "device": str(a.device),
           "args": {k: str(v) if k == "device" else v for k, v in vars(a).items() if k != "json"}}
    if "sampling" in blocks:
        gen = load_model(a.generator, "causal-lm", device=a.device).eval()
        out["quality"] = quality_checks(a, gen, tok, names, template, task)
        out["sampling"] = sampling_block(a, gen, tok, names, template, threads)
        del gen
    if "lm" in blocks:
        out["lm_step"] = lm_block(a, tok, names, template, task, threads)
    if "matching" in blocks:
        out["matching"] = matching_block(a, tok, names, template, task, threads)
    if "probe" in blocks:
        out["probe"] = probe_block(a, task, threads)
    report(out)
    if a.json:
        write(a.json, out)


if __name__ == "__main__":
    main()
