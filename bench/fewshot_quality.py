"""Does showing the generator a few real examples of the class help a 135M generator? Few-shot prompts against the
plain task prompt, from one LM-stage checkpoint, selected and judged the same way (not run in CI).

    python bench/fewshot_quality.py --out /tmp/fewshot                       # trains the demo's LM stage first
    python bench/fewshot_quality.py --out /tmp/fewshot --lm runs/sweeps/lm/KEY   # from a sweep's LM checkpoint

* **plain**: ``--candidates`` texts per class sampled from the task template's prompt (what a run samples);
* **few-shot**: the same number, from prompts that first show ``--shots`` training examples of the class, each
  rendered as the LM stage saw them (prompt, text, EOS); ``--shot-sets`` different draws of shots per class, an
  equal share of the candidates from each.

Both pools go through the run's selection (copy filter, label filter, herding: :func:`select_from_pool`), ``--sets``
sets per DPC, each from its seeded random half of the pool. Named baseline: **plain**; reported per judge
(``minilm-probe``, ``smollm2-probe`` — a feature space the selection never saw — and TF-IDF): each method's mean,
few-shot − plain paired by set seed, and each against random real sets (Welch), with 95 % intervals; the label
agreement of all candidates and their copies of training texts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time
from pathlib import Path

import torch

from dilm.coreset import CoresetConfig, build_coresets
from dilm.distill import DistillConfig, Distiller, train_lm
from dilm.distill.select import select_from_pool
from dilm.evaluate import Evaluator
from dilm.files import write_json
from dilm.generator import render, sample_classes
from dilm.labelspace import paired_interval
from dilm.memorisation import CopyIndex, joined, memorisation_report
from dilm.protocol import EvalConfig
from dilm.seeds import derive_seed
from dilm.tasks import load_task
from tune.scores import difference_interval


def welch_interval(a: list[float], b: list[float]) -> dict:
    """Mean of ``a`` − mean of ``b`` (independent sets) with Welch's 95 % interval."""
    def summary(x: list[float]) -> dict:
        return {"accuracy": statistics.fmean(x), "accuracy_std": statistics.stdev(x), "n": len(x)}

    lo, hi = difference_interval(summary(a), summary(b))
    return {"mean": statistics.fmean(a) - statistics.fmean(b), "lo": lo, "hi": hi, "n": [len(a), len(b)]}


def fewshot_pool(ctx: Distiller, per_class: int, shots: int, shot_sets: int, seed: int) -> list[list]:
    """Per class, ``per_class`` candidates from ``shot_sets`` prompts, each showing ``shots`` training examples of
    the class (seeded draws) before the class's prompt."""
    tok = ctx.gen_tok
    pool = []
    for c, name in enumerate(ctx.task.label_names):
        group = [e for e in ctx.train if e.label == c]
        out = []
        for j in range(shot_sets):
            shown = random.Random(derive_seed(seed, "shots", c, j)).sample(group, shots)
            template = "".join(render(name, e.text, e.text_pair, tok.eos_token, ctx.template) for e in shown)
            template += ctx.template
            n = per_class // shot_sets + (j < per_class % shot_sets)
            out += sample_classes(ctx.sampler, tok, [name], [n], derive_seed(seed, "few-shot", c, j),
                                  dataclasses.replace(ctx.sampling, template=template))[0]
        pool.append(out)
    ctx.generator.train()
    return pool


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lm", default="", help="an LM-stage checkpoint (default: train the demo preset's in OUT/lm)")
    p.add_argument("--task", default="sst2")
    p.add_argument("--candidates", type=int, default=200, help="candidates per class of each pool")
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--shot-sets", type=int, default=8)
    p.add_argument("--sets", type=int, default=5, help="sets per DPC, each from its random half of the pool")
    p.add_argument("--dpc", default="5,10")
    p.add_argument("--judges", default="minilm-probe,smollm2-probe,tfidf-logreg")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dpcs = sorted(int(x) for x in a.dpc.split(","))
    task = load_task(a.task)
    cfg = DistillConfig.from_preset("demo", task=a.task, device="cpu", dpc=tuple(dpcs), n_sets=a.sets,
                                    output_dir=str(a.out / "run"))
    lm = a.lm or str(train_lm(cfg, a.out / "lm", task=task))
    ctx = Distiller(DistillConfig(**{**cfg.to_dict(), "lm_checkpoint": lm}), task=task)
    out = {"command": "python bench/fewshot_quality.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                     for k, v in vars(a).items()),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "lm": lm, "config": cfg.to_dict(),
           "pools": {}, "judges": {}}
    c, seed = task.num_classes, derive_seed(cfg.seed, "final candidates")
    seeds = [derive_seed(cfg.seed, "final set", k) for k in range(a.sets)]
    train_index = CopyIndex(joined(e) for e in task.train)
    sets = {}
    for method in ("plain", "few-shot"):
        t = time.perf_counter()
        pool = (ctx.sample([a.candidates] * c, seed) if method == "plain"
                else fewshot_pool(ctx, a.candidates, a.shots, a.shot_sets, seed))
        drawn_s = time.perf_counter() - t
        sets[method] = select_from_pool(ctx, pool, dpcs, seeds)
        texts = [joined(s) for group in pool for s in group]
        out["pools"][method] = {
            "candidates": len(texts), "sample_s": drawn_s, "label_agreement": 100 * ctx.probe.agreement(pool),
            "train_copies": memorisation_report(texts, train_index)["train"],
            "examples": {name: [s.text for s in group[:4]] for name, group in zip(task.label_names, pool)}}
        print(method, json.dumps({k: v for k, v in out["pools"][method].items() if k != "examples"}), flush=True)
    real = build_coresets(task, CoresetConfig(method="random", dpc=tuple(dpcs), n_sets=a.sets, learner=cfg.learner,
                                              seed=0, device="cpu"), ctx.device)
    rows = ["| judge | DPC | plain (n) | few-shot (n) | few-shot − plain [95 % CI] | random real | plain − random "
            "| few-shot − random |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def ci(x: dict) -> str:
        return f"{x['mean']:+.1f} [{x['lo']:+.1f}, {x['hi']:+.1f}]"

    for judge in a.judges.split(","):
        ev = Evaluator(task, EvalConfig(archs=(judge,), seeds=1, device="cpu", progress=False))
        for d in dpcs:
            acc = {m: [ev.evaluate([s]).summary()[judge]["accuracy"] for s in got]
                   for m, got in (("plain", sets["plain"][d]), ("few-shot", sets["few-shot"][d]), ("random", real[d]))}
            cell = {"accuracies": acc, "few-shot - plain": paired_interval(
                [f - q for f, q in zip(acc["few-shot"], acc["plain"])]),
                    "plain - random": welch_interval(acc["plain"], acc["random"]),
                    "few-shot - random": welch_interval(acc["few-shot"], acc["random"])}
            out["judges"][f"{judge}/dpc{d}"] = cell
            mean = {m: sum(v) / len(v) for m, v in acc.items()}
            rows.append(f"| {judge} | {d} | {mean['plain']:.1f} ({len(acc['plain'])}) | {mean['few-shot']:.1f} "
                        f"({len(acc['few-shot'])}) | {ci(cell['few-shot - plain'])} | {mean['random']:.1f} | "
                        f"{ci(cell['plain - random'])} | {ci(cell['few-shot - random'])} |")
            print(rows[-1], flush=True)
            write_json(a.out / "fewshot_quality.json", out)
    out["table"] = "\n".join(rows)
    write_json(a.out / "fewshot_quality.json", out)
    print(out["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
