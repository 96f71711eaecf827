"""CPU-scale evidence of the method: one shared LM stage, then vanilla vs matching from the same checkpoint,
against random and herding coresets of real data — the README's CPU-scale table (not run in CI).

    nice python bench/cpu_quality.py --out runs/cpu_quality                 # SmolLM2 + MiniLM, SST-2, DPC 10
    python bench/cpu_quality.py --out /tmp/cq --quick                       # tiny models, end to end in minutes

Stages, in the order their cells are written (the JSON is rewritten after every cell, so a run cut short keeps
what it measured):

1. **step-0 prompts** — the untrained generator sampled from the bare ``label`` format and from the task's
   plain-words template: prompt tokens and the probe's label agreement (%) of the samples;
2. **LM stage**, trained once (:func:`dilm.distill.train_lm`) with the task's template (the prompted warm start);
3. **sets** — random (``--sets`` seeded draws) and herding (deterministic: one set) of real data; vanilla
   (``outer_loops=0``) and matching (a CPU-sized matching stage), both started from that checkpoint and sampled
   with the same seeds, so the two differ only by the matching steps; label agreement of their final sets;
4. **minilm-probe** scores of each method right after its sets (deterministic: one fit per set);
5. **fine-tuned learner** (the protocol's 200 steps, full test split) in passes of one training seed per set,
   every method per pass, so that a cut-short run still compares all methods.

The matching stage is sized for two cores: few generator steps at a learning rate that keeps the prompted
model fluent (1e-5, cosine), one representative set, a small pool, no validation (every validation costs a
sampling round and a learner). Named baseline: every row's "Δ random" is its mean minus random's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from dilm.archs.finetune import finetune_ensemble
from dilm.coreset import CoresetConfig, build_coresets
from dilm.distill import DistillConfig, Distiller, distill, train_lm
from dilm.evaluate import Evaluator
from dilm.files import write_json
from dilm.generator import make_sampler, prompt, resolve_template, sample_classes
from dilm.models import load_model, pick_device
from dilm.probe import LabelProbe
from dilm.protocol import EvalConfig
from dilm.synset import read_set
from dilm.tasks import load_task

METHODS = ("random", "herding", "vanilla", "matching")
BASE = dict(  # shared by the LM stage, vanilla and matching
    generator="smollm2-135m", learner="minilm-l6", dpc=(10,), lm_steps=150, lm_lr=1e-4, lm_batch_size=8,
    max_length=48, prompt_template="task", val_interval=0, over_sample=2, max_new_tokens=32, gen_batch_size=64,
    probe="minilm-l6", probe_examples=4000, top_p=0.6)
MATCHING = dict(  # the CPU-sized matching stage
    outer_loops=2, inner_loop=3, generate_interval=2, model_step_per_inner_step=5, generator_lr=1e-5,
    syn_per_class=8, pool_per_class=16, real_per_class=16, n_rep_sets=1, learner_batch_size=16,
    checkpoint_interval=100)
QUICK = dict(generator="tiny-llama", learner="tiny-bert", probe="tiny-bert", lm_steps=4, max_new_tokens=12,
             probe_examples=500)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the LM checkpoint, the sets and the JSON")
    p.add_argument("--task", default="sst2")
    p.add_argument("--sets", type=int, default=5, help="sets per method (herding: 1)")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per set")
    p.add_argument("--ft-steps", type=int, default=200, help="fine-tuned learner steps (protocol: 200)")
    p.add_argument("--step0-samples", type=int, default=16, help="untrained samples per class and template")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a distill key of the base or matching config (JSON values)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    p.add_argument("--workers", type=int, default=2, help="fine-tuning processes (one torch thread each)")
    p.add_argument("--quick", action="store_true", help="tiny random models: " + json.dumps(QUICK))
    return p.parse_args()


class Record:
    """The bench's JSON, rewritten (atomically) after every cell."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.data = path, {"meta": meta, "cells": {}}
        self.t0 = time.perf_counter()

    def cell(self, name: str, **values) -> None:
        self.data["cells"][name] = {**values, "elapsed_s": round(time.perf_counter() - self.t0, 1)}
        write_json(self.path, self.data)
        print(f"[{self.data['cells'][name]['elapsed_s']:>7.0f} s] {name}: "
              f"{json.dumps({k: v for k, v in values.items() if not isinstance(v, list | dict)})}", flush=True)


def step0_prompts(cfg: DistillConfig, task, probe: LabelProbe, n: int, device) -> dict:
    """Untrained generator: prompt tokens and label agreement (%) of ``n`` samples per class, per template."""
    run = Distiller(cfg, task=task)
    out = {}
    for key in ("label", "task"):
        template = resolve_template(key, task.name)
        sampler = make_sampler(run.generator, run.gen_tok, device, max_new_tokens=cfg.max_new_tokens,
                               batch_size=cfg.gen_batch_size, label_names=task.label_names, template=template)
        samples = sample_classes(sampler, run.gen_tok, list(task.label_names), [n] * task.num_classes, task.is_pair,
                                 top_p=cfg.top_p, seed=cfg.seed, allow_unfinished=True, template=template)
        tokens = [len(run.gen_tok(prompt(name, template), add_special_tokens=False)["input_ids"])
                  for name in task.label_names]
        out[key] = {"template": template, "prompt_tokens": statistics.fmean(tokens),
                    "label_agreement": 100 * probe.agreement(samples), "n": sum(map(len, samples)),
                    "examples": [s.text for group in samples for s in group[:2]]}
    return out


_WORKER: dict = {}


def _worker_init(task_name: str, learner: str, steps: int) -> None:
    torch.set_num_threads(1)
    task, cpu = load_task(task_name), torch.device("cpu")
    _WORKER.update(task=task, learner=learner, base=load_model(learner, "classifier", task.num_classes, cpu),
                   cfg=EvalConfig(archs=(learner,), seeds=1, steps=steps, device="cpu", progress=False),
                   gold=np.array([e.label for e in task.test]))


def _finetune(job: tuple) -> float:
    """Accuracy (%) on the full test split of a learner fine-tuned on one set with one training seed."""
    synset, seed = job
    w = _WORKER
    pred = finetune_ensemble(w["learner"], [(synset, seed)], w["task"].test, w["cfg"], torch.device("cpu"),
                             w["base"])[0]
    return 100 * float((pred == w["gold"]).mean())


def finetune_passes(sets: dict[str, list], task, args, learner: str, rec: Record) -> None:
    """Every (set, seed) of every method fine-tuned, in passes of one training seed per set, every method per
    pass (a run cut short still compares all methods); ``--workers`` processes of one torch thread each (on 2
    cores a MiniLM-L6 step takes 0.45 s on one thread and 0.27 s on two: two one-thread learners side by side
    train ~1.2x faster than one two-thread learner after another)."""
    jobs = [(seed, m, s) for seed in range(args.seeds) for m in METHODS for s in sets[m]]
    accs: dict[str, list[float]] = {m: [] for m in METHODS}
    left = {(seed, m): len(sets[m]) for seed in range(args.seeds) for m in METHODS}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, ctx, _worker_init, (task.name, learner, args.ft_steps)) as pool:
        for (seed, m, _), acc in zip(jobs, pool.map(_finetune, [(s, seed) for seed, _, s in jobs])):
            accs[m].append(acc)
            left[seed, m] -= 1
            if not left[seed, m]:
                rec.cell(f"finetune/{m}", **mean_std(accs[m]), accuracies=accs[m], seeds=seed + 1)


def mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def table(cells: dict) -> str:
    rows = ["| method | minilm-probe | fine-tuned learner | label agreement |", "| --- | --- | --- | --- |"]
    ref = {arch: cells.get(f"{arch}/random", {}).get("mean") for arch in ("probe", "finetune")}
    for m in METHODS:
        parts = []
        for arch in ("probe", "finetune"):
            c = cells.get(f"{arch}/{m}")
            if not c:
                parts.append("—")
                continue
            delta = "" if m == "random" or ref[arch] is None else f" (Δ random {c['mean'] - ref[arch]:+.1f})"
            parts.append(f"{c['mean']:.1f} ± {c['std']:.1f} (n={c['n']}){delta}")
        agree = cells.get(f"sets/{m}", {}).get("label_agreement")
        parts.append("—" if agree is None else f"{agree:.1f}")
        rows.append(f"| {m} | " + " | ".join(parts) + " |")
    return "\n".join(rows)


def main() -> int:
    args = parse()
    torch.set_num_threads(args.threads)
    device = pick_device("cpu")
    overrides = {k: json.loads(v) if v[:1] in "0123456789-[{tf" else v
                 for k, v in (s.split("=", 1) for s in args.set)}
    base = {**BASE, **(QUICK if args.quick else {}), **{k: v for k, v in overrides.items() if k not in MATCHING}}
    cfg = DistillConfig(task=args.task, n_sets=args.sets, output_dir=str(args.out / "vanilla"), outer_loops=0, **base)
    matching = dataclasses.replace(cfg, output_dir=str(args.out / "matching"),
                                   **{**MATCHING, **{k: v for k, v in overrides.items() if k in MATCHING}})
    task = load_task(args.task)
    rec = Record(args.out / "cpu_quality.json", {
        "command": "python bench/cpu_quality.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                            vars(args).items() if k not in ("quick",)),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(), "vanilla": cfg.to_dict(), "matching": matching.to_dict()})

    probe_model = load_model(cfg.probe, "base", device=device)
    probe = LabelProbe.for_task(task, cfg.probe, device, probe_model, cfg.probe_examples)
    rec.cell("probe", encoder=cfg.probe, fitted_on=cfg.probe_examples or len(task.train))
    rec.cell("step0", **step0_prompts(cfg, task, probe, args.step0_samples, device))

    lm = train_lm(cfg, args.out / "lm", task=task)
    rec.cell("lm", path=str(lm), **{k: v for k, v in json.loads((lm / "dilm_lm.json").read_text()).items()
                                    if k in ("key", "final_lm_loss", "lm_s", "train_examples")})

    probe_eval = Evaluator(task, EvalConfig(archs=(f"{cfg.probe}-probe" if cfg.probe != "minilm-l6" else
                                                   "minilm-probe",), seeds=1, device="cpu", progress=False))

    def probe_cell(method: str) -> None:  # right after the method's sets: a run cut short keeps its scores
        summary = next(iter(probe_eval.evaluate(sets[method]).summary().values()))
        rec.cell(f"probe/{method}", mean=summary["accuracy"], std=summary["accuracy_std"], n=summary["n"])

    sets: dict[str, list] = {}
    for method in ("random", "herding"):
        cs = CoresetConfig(method=method, dpc=cfg.dpc, n_sets=args.sets, learner=cfg.learner,
                           candidates_per_class=1000, seed=0, device="cpu")
        sets[method] = build_coresets(task, cs, device)[cfg.dpc[0]]
        rec.cell(f"sets/{method}", n=len(sets[method]),
                 label_agreement=100 * probe.agreement([[e for s in sets[method] for e in s.examples
                                                        if e.label == c] for c in range(task.num_classes)]))
        probe_cell(method)
    for method, mcfg in (("vanilla", cfg), ("matching", matching)):
        t = time.perf_counter()
        result = distill(dataclasses.replace(mcfg, lm_checkpoint=str(lm)))
        sets[method] = [read_set(p, task.label_names, task.is_pair) for p in result.sets[cfg.dpc[0]]]
        final = {k: v for r in result.history for k, v in r.items() if k.startswith("final_label_agreement")}
        rec.cell(f"sets/{method}", n=len(sets[method]), seconds=time.perf_counter() - t, timings=result.timings,
                 label_agreement=final.get(f"final_label_agreement/dpc{cfg.dpc[0]}"),
                 candidates_label_agreement=final.get("final_label_agreement"),
                 pool_label_agreement=[r["label_agreement"] for r in result.history if "label_agreement" in r],
                 match_steps=[{k: r[k] for k in ("step", "match_loss", "grad_sim")} for r in result.history
                              if "match_loss" in r],
                 examples=[e.text for e in sets[method][0].examples[:: max(1, cfg.dpc[0] // 2)]])
        probe_cell(method)


    finetune_passes(sets, task, args, cfg.learner, rec)
    print(table(rec.data["cells"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
