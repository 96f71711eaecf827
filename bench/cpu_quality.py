"""CPU-scale evidence of the selection stage: from one shared LM stage, the same generated candidates selected the
reference's way and the new ways, beside random, k-centers and herding sets of real data, scored by judges that the
selection did and did not see (not run in CI).

    nice python bench/cpu_quality.py --out runs/cpu_quality                    # SmolLM2 + MiniLM, SST-2, DPC 5/10
    python bench/cpu_quality.py --out runs/cq --dpc 5,10,20 --match-outer 4    # + DPC 20, the matched generator
    python bench/cpu_quality.py --out runs/cq-ag --task ag_news --dpc 5 --sets 5 --candidates 100
    python bench/cpu_quality.py --out /tmp/cq --quick                          # tiny models, end to end in minutes

Stages, in the order their cells are written (the JSON is rewritten after every cell, so a run cut short keeps
what it measured):

1. **LM stage**, trained once (:func:`dilm.distill.train_lm`; the vanilla LM: no matching stage);
2. **candidates**: per set k, ``--candidates`` texts per class sampled with set k's seed; every selection of set k
   reads the same candidates, so two selections differ only by how they choose (paired by set);
   with ``--match-outer N``, the **matching stage** (:data:`MATCH`: N outer loops × 5 generator steps, head-only
   gradient, no validation, so the matched generator is measured as it ends) runs from the same LM checkpoint
   and its generator samples the same counts with the same seeds: ``match:<selection>`` is matching, paired
   set by set with vanilla's ``<selection>``; ``--both`` adds ``both:filter+herding``, the default selection over
   the two generators' candidates of set k together; ``--lm-pool`` adds ``lm2:filter+herding``, the same
   selection over the vanilla LM's candidates of set k and a second LM draw of the same size (the product's second
   draw's seed, :func:`~dilm.distill.candidates.final_seed`),
   pooled the same way: the pool of ``both:``'s size without matching, so ``both:`` − ``lm2:`` is what matching
   adds beyond a larger pool; ``--balanced`` adds ``bal:filter+herding``, DPC//2 per class from the vanilla LM's
   candidates and the rest from the matched generator's, each source filtered and herded on its own (so the set
   holds as many matched texts as the split says, where herding over the pool keeps few): the product's
   ``final_mix: split`` (:func:`~dilm.distill.select.select_sets` with the first draw's counts), and with
   ``--lm-pool`` its twin without matching, ``lm2bal:filter+herding`` (the same split over the two LM draws); every
   selection goes through the product's ``select_sets`` with its seeds (``final_set_seeds``);
3. **sets**: the selections of :data:`WAYS` at every DPC; random and k-centers (``--sets`` seeded draws) and
   herding (deterministic: one set) of real data; label agreement and the memorisation report of each method;
   with ``--soft``, ``<selection>+soft``: the same texts with soft labels learned by :class:`dilm.softlabel.
   SoftLabeler` (its defaults);
4. **judges** on every set: ``minilm-probe`` (MiniLM's feature space: the one the filter and herding work in),
   ``smollm2-probe`` (the frozen SmolLM2-135M's mean-pooled states: a space no selection saw) and TF-IDF; then the
   protocol's **fine-tuned MiniLM-L6** (200 steps, full test split) at ``--ft-dpc`` on ``--ft-methods``, one
   training seed per set per pass, in ``--workers`` one-thread processes.

Named baselines: every method's difference to **random real** sets, to the reference's **k-means** selection of
the same candidates and to its twin (matching against the vanilla LM under the same selection; soft against hard
labels on the same texts; ``lm2:`` against vanilla), and ``both:`` to ``lm2:`` (the same pool size), as the mean
of paired differences (set k with set k) with a Student-t 95 % interval.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from record import head, write  # bench/, beside this script

from dilm.archs.finetune import exit_with_parent, finetune_ensemble
from dilm.coreset import CoresetConfig, build_coresets
from dilm.distill import DistillConfig, Distiller, State, train_lm
from dilm.distill.candidates import GENERATOR_DRAW, LM_DRAW, final_seed
from dilm.distill.match_stage import match
from dilm.distill.select import Selection, final_set_seeds, select_sets
from dilm.evaluate import Evaluator
from dilm.files import write_json
from dilm.generator import Sample
from dilm.memorisation import CopyIndex, memorisation_report
from dilm.models import load_model
from dilm.protocol import EvalConfig
from dilm.selection import both_generators
from dilm.softlabel import SoftLabelConfig, SoftLabeler
from dilm.stats import format_interval, paired_interval, summary
from dilm.synset import SynSet
from dilm.tasks import load_task

WAYS = {  # the selections this bench runs: name → how the candidates are chosen
    "kmeans": Selection(method="kmeans", label_filter="none", pooling="cls"),  # the reference's "k-centers"
    "herding": Selection(method="herding", label_filter="none", pooling="mean"),
    "filter+herding": Selection(method="herding", label_filter="probe", pooling="mean"),
    "filter+herding-real": Selection(method="herding-real", label_filter="probe", pooling="mean"),
    "filter90+herding": Selection(method="herding", label_filter="probe", threshold=0.9, pooling="mean"),
    "filter+kmeans": Selection(method="kmeans", label_filter="probe", pooling="mean"),
    "filter90+kmeans": Selection(method="kmeans", label_filter="probe", threshold=0.9, pooling="mean"),
}
REAL = ("random", "kcenters", "herding-real-data")  # coresets: each of --sets sets from its own random half
BASE = dict(  # the LM stage and the sampler
    generator="smollm2-135m", learner="minilm-l6", lm_steps=150, lm_lr=1e-4, lm_batch_size=8, max_length=48,
    prompt_template="task", val_interval=0, outer_loops=0, max_new_tokens=32, gen_batch_size=64,
    probe="minilm-l6", probe_examples=4000, top_p=0.6)
LONG_TEXTS = dict(max_length=0, max_new_tokens=0, length_cap=96)  # tasks other than SST-2: limits from the data
MATCH = dict(  # the matching stage at CPU scale (--match-outer N outer loops): the demo preset's shapes, more steps
    inner_loop=5, model_step_per_inner_step=1, syn_per_class=4, real_per_class=8, rep_pool_per_class=1000,
    learner_batch_size=16, val_interval=0, checkpoint_interval=1000)
QUICK = dict(generator="tiny-llama", learner="tiny-bert", probe="tiny-bert", lm_steps=4, max_new_tokens=12,
             probe_examples=500)
QUICK_JUDGES = ("tiny-bert-probe", "tiny-llama-probe", "tfidf-logreg")


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the LM checkpoint and the JSON")
    p.add_argument("--task", default="sst2")
    p.add_argument("--dpc", default="5,10", help="comma-separated DPCs")
    p.add_argument("--sets", type=int, default=10, help="sets per method (real herding: 1)")
    p.add_argument("--candidates", type=int, default=200, help="generated candidates per class per set")
    p.add_argument("--judges", default="minilm-probe,smollm2-probe,tfidf-logreg")
    p.add_argument("--ft-dpc", default="10", help="comma-separated DPCs the fine-tuned learner scores (0: none)")
    p.add_argument("--ft-methods", default="random,kmeans,filter+herding,match:filter+herding,herding-real-data")
    p.add_argument("--ft-sets", type=int, default=5, help="sets per method the fine-tuned learner trains on")
    p.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds per set")
    p.add_argument("--ft-steps", type=int, default=200, help="fine-tuned learner steps (protocol: 200)")
    p.add_argument("--match-outer", type=int, default=0,
                   help="outer loops of the matching stage (x 5 generator steps); 0: no matching arm")
    p.add_argument("--both", action="store_true",
                   help="with --match-outer: also filter + herding over both generators' candidates together (both:)")
    p.add_argument("--lm-pool", action="store_true",
                   help="lm2:filter+herding, the vanilla LM's candidates with a second LM draw of the same size")
    p.add_argument("--balanced", action="store_true",
                   help="with --match-outer: bal:filter+herding, half of each class from each generator's candidates")
    p.add_argument("--match-lr", type=float, default=3e-5, help="the matching stage's generator lr")
    p.add_argument("--draw-seed", type=int, default=None,
                   help="seed of the candidates' draws (default: the config's, the product's final_seed): another "
                        "draw from the same generators")
    p.add_argument("--lm-steps", type=int, default=BASE["lm_steps"], help="the LM stage's steps")
    p.add_argument("--ways", default="kmeans,herding,filter+herding,filter+herding-real",
                   help="comma-separated selections of the vanilla LM's candidates (of: " + ", ".join(WAYS) + ")")
    p.add_argument("--match-ways", default="kmeans,filter+herding",
                   help="comma-separated selections of the matched generator's candidates alone (match:)")
    p.add_argument("--split-ways", default="filter+herding",
                   help="comma-separated selections of the bal: and lm2bal: arms (final_mix split)")
    p.add_argument("--soft", default="filter+herding",
                   help="comma-separated methods whose sets also get learned soft labels ('': none)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    p.add_argument("--workers", type=int, default=2, help="fine-tuning processes (one torch thread each)")
    p.add_argument("--report", action="store_true",
                   help="only the paired differences and the table of --out's JSON (a run cut short)")
    p.add_argument("--quick", action="store_true", help="tiny random models: " + json.dumps(QUICK))
    return p.parse_args()


class Record:
    """The bench's JSON, rewritten (atomically) after every cell."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.data = path, {"meta": meta, "cells": {}}  # bench/record.py's head beside them
        self.t0 = time.perf_counter()
        head()  # taken now: the date and commit the run started from, not those of its first cell

    def cell(self, name: str, **values) -> None:
        self.data["cells"][name] = {**values, "elapsed_s": round(time.perf_counter() - self.t0, 1)}
        write(self.path, self.data)
        print(f"[{self.data['cells'][name]['elapsed_s']:>7.0f} s] {name}: "
              f"{json.dumps({k: v for k, v in values.items() if not isinstance(v, list | dict)})}", flush=True)


_WORKER: dict = {}


def _worker_init(task_name: str, learner: str, steps: int) -> None:
    exit_with_parent()  # a run stopped by a signal leaves no worker fine-tuning on
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


def summarise(accs: list[float]) -> dict:
    return {**summary(accs), "accuracies": accs}


def paired(cells: dict, judge: str, dpc: int, method: str, against: str) -> dict | None:
    """Mean of ``method`` − ``against`` over the sets both have (set k with set k), with its 95 % interval."""
    a, b = cells.get(f"{judge}/dpc{dpc}/{method}"), cells.get(f"{judge}/dpc{dpc}/{against}")
    if not a or not b or method == against:
        return None
    n = min(len(a["accuracies"]), len(b["accuracies"]))
    if n < 2:
        return None
    return paired_interval([x - y for x, y in zip(a["accuracies"][:n], b["accuracies"][:n])])


def best_coreset(cells: dict, judge: str, dpc: int) -> str | None:
    """The real coreset (of :data:`REAL`) with the highest mean under ``judge`` at ``dpc``: what a generated set must
    beat."""
    have = [m for m in REAL if f"{judge}/dpc{dpc}/{m}" in cells]
    return max(have, key=lambda m: cells[f"{judge}/dpc{dpc}/{m}"]["mean"]) if have else None


def twin(method: str) -> str | None:
    """What ``method`` differs from by one thing: the vanilla LM's candidates under the same selection
    (``match:<s>``, ``both:<s>`` and ``lm2:<s>`` → ``<s>``), the same texts with hard labels (``<m>+soft`` →
    ``<m>``)."""
    if method.startswith(("match:", "both:", "lm2:", "bal:", "lm2bal:")):
        return method.split(":", 1)[1]
    return method.removesuffix("+soft") if method.endswith("+soft") else None


def pool_twin(method: str) -> str | None:
    """``both:<s>`` → ``lm2:<s>``, ``bal:<s>`` → ``lm2bal:<s>``: the vanilla LM's pool of the same size, chosen the
    same way (``--lm-pool``)."""
    for pooled, alone in (("both:", "lm2:"), ("bal:", "lm2bal:")):
        if method.startswith(pooled):
            return alone + method.split(":", 1)[1]
    return None


def markdown_table(cells: dict, judges: list[str], dpcs: list[int], methods: list[str]) -> str:
    rows = ["| judge | DPC | method | accuracy (n) | − best coreset [95 % CI] | − random [95 % CI] "
            "| − k-means [95 % CI] | − twin [95 % CI] | − lm2 [95 % CI] |", "|" + " --- |" * 9]

    def ci(p: dict | None) -> str:
        return "" if p is None else format_interval(p)

    for judge in judges:
        for d in dpcs:
            for m in methods:
                c = cells.get(f"{judge}/dpc{d}/{m}")
                if c:
                    best = best_coreset(cells, judge, d)
                    vs = [f"{ci(paired(cells, judge, d, m, best))} ({best})" if best and m not in REAL else ""]
                    vs += [ci(paired(cells, judge, d, m, base)) for base in ("random", "kmeans")]
                    t = twin(m)
                    vs.append(f"{ci(paired(cells, judge, d, m, t))} ({t})" if t else "")
                    vs.append(ci(paired(cells, judge, d, m, pool_twin(m))) if pool_twin(m) else "")
                    rows.append(f"| {judge} | {d} | {m} | {c['mean']:.1f} ± {c['std']:.1f} ({c['n']}) | "
                                f"{' | '.join(vs)} |")
    return "\n".join(rows)


def main() -> int:
    args = arguments()
    if args.report:
        path = args.out / "cpu_quality.json"
        report(path, json.loads(path.read_text()))
        return 0
    torch.set_num_threads(args.threads)
    dpcs = sorted(int(x) for x in args.dpc.split(","))
    judges = list(QUICK_JUDGES if args.quick else args.judges.split(","))
    cfg = DistillConfig(task=args.task, dpc=tuple(dpcs), n_sets=args.sets, output_dir=str(args.out / "run"),
                        **{**BASE, "lm_steps": args.lm_steps, **({} if args.task == "sst2" else LONG_TEXTS),
                           **(QUICK if args.quick else {})})
    task = load_task(args.task)
    rec = Record(args.out / "cpu_quality.json", {
        "args": {k: str(v) for k, v in vars(args).items()}, "config": cfg.to_dict(),
        "selections": {k: vars(v) for k, v in WAYS.items()}})

    lm = train_lm(cfg, args.out / "lm", task=task)
    meta = json.loads((lm / "dilm_lm.json").read_text())
    rec.cell("lm", path=str(lm), **{k: meta[k] for k in ("key", "final_lm_loss", "lm_s", "train_examples")})

    ctx = Distiller(DistillConfig(**{**cfg.to_dict(), "lm_checkpoint": str(lm), "dpc": tuple(dpcs)}), task=task)
    c = task.num_classes

    def kept_path(cell: str) -> Path:
        return args.out / f"{cell.replace('/', '-')}.json"

    def kept_key(gen_key: str) -> dict:
        return {"lm": meta["key"], "per_class": args.candidates, "sets": args.sets, "generator": gen_key,
                **({} if args.draw_seed is None else {"draw_seed": args.draw_seed})}

    def kept_candidates(cell: str, gen_key: str) -> list[list] | None:
        """The candidates of ``cell`` kept by an earlier run with the same LM, generator and counts, or None."""
        path = kept_path(cell)
        data = json.loads(path.read_text()) if path.exists() else {}
        if data.get("key") != kept_key(gen_key):
            return None
        print(f"candidates of {cell}: kept in {path}", flush=True)
        return [[Sample(**s) for s in row] for row in data["samples"]]

    def candidates_of(gen: Distiller, cell: str, draw: str = LM_DRAW, gen_key: str = "",
                      before: Callable[[], None] | None = None) -> list[list[list]]:
        """``--candidates`` per class for each set, with the product's seed of ``draw`` (:func:`final_seed`): the
        same whichever generator samples them, so that the generators' candidates pair set by set. ``before``: what
        the generator needs first (matching), run only when the candidates are not kept."""
        gen_key = gen_key or f"the LM, draw {draw}"
        got = kept_candidates(cell, gen_key)
        if got is None:
            if before is not None:
                before()
            t = time.perf_counter()
            seeded = cfg if args.draw_seed is None else replace(cfg, seed=args.draw_seed)
            got = gen.sample([args.candidates] * (c * args.sets), final_seed(seeded, draw),
                             list(task.label_names) * args.sets)
            n_samples = sum(map(len, got))
            rec.cell(cell, per_class=args.candidates, sets=args.sets, samples=n_samples,
                     seconds=time.perf_counter() - t, samples_per_s=n_samples / (time.perf_counter() - t),
                     label_agreement=100 * gen.probe.agreement([sum(got[i::c], []) for i in range(c)]))
            write_json(kept_path(cell), {"key": kept_key(gen_key), "samples": [[vars(s) for s in row] for row in got]})
        return [got[k * c: (k + 1) * c] for k in range(args.sets)]

    vanilla = candidates_of(ctx, "candidates")
    ways, split_ways = args.ways.split(","), args.split_ways.split(",")
    arms = [("", ctx, vanilla, ways, None)]  # (prefix, generator, candidates per set, selections, split)
    if args.lm_pool:  # a pool of both:'s size from the vanilla LM alone (the product's second LM draw)
        second = candidates_of(ctx, "candidates/lm2", GENERATOR_DRAW)
        arms.append(("lm2:", ctx, [both_generators(a, b) for a, b in zip(vanilla, second)], ["filter+herding"], None))
        if args.balanced:
            arms.append(("lm2bal:", ctx, [both_generators(a, b) for a, b in zip(vanilla, second)], split_ways,
                         vanilla))
    if args.match_outer:
        n = args.match_outer
        mctx = Distiller(DistillConfig(**{
            **cfg.to_dict(), **MATCH, "lm_checkpoint": str(lm), "dpc": tuple(dpcs),
            "output_dir": str(args.out / "match"), "outer_loops": n, "generate_interval": n, "n_rep_sets": n,
            "generator_lr": args.match_lr}), task=task)

        def matching() -> None:
            state, t = State(stage="match", step=mctx.cfg.lm_steps), time.perf_counter()
            match(mctx, state, None)
            losses = [r["match_loss"] for r in state.history if "match_loss" in r]
            rec.cell("matching", generator_steps=state.step - mctx.cfg.lm_steps, seconds=time.perf_counter() - t,
                     generator_lr=args.match_lr, first_loss=losses[0] if losses else None,
                     last_loss=losses[-1] if losses else None, history=state.history)

        matched = candidates_of(mctx, "candidates/match", gen_key=f"matched: {n} outer loops, lr {args.match_lr}",
                                before=matching)  # kept candidates: no need for the matched generator
        arms.append(("match:", mctx, matched, args.match_ways.split(","), None))
        pooled = [both_generators(vs, ms) for vs, ms in zip(vanilla, matched)]  # the product's generator+lm pool
        if args.both:  # final_mix pooled: one pool per set and class
            arms.append(("both:", ctx, pooled, ["filter+herding"], None))
        if args.balanced:  # final_mix split: DPC//2 per class from the vanilla LM's draw, the rest the matched one's
            arms.append(("bal:", ctx, pooled, split_ways, vanilla))

    sets: dict[tuple[int, str], list[SynSet]] = {}
    train_index, test_index = CopyIndex(e.text for e in task.train), CopyIndex(e.text for e in task.test)

    def record_sets(name: str, gen: Distiller, t: float) -> None:
        chosen = sets[dpcs[-1], name]
        rec.cell(f"sets/{name}", seconds=time.perf_counter() - t,
                 label_agreement=100 * gen.probe.agreement(
                     [[e for s in chosen for e in s.examples if e.label == i] for i in range(c)]),
                 memorisation=memorisation_report([e.text for s in chosen for e in s.examples], train_index,
                                                  test_index),
                 examples=[e.text for e in chosen[0].examples[:: max(1, dpcs[-1] // 2)]])

    seeds = final_set_seeds(cfg)
    for prefix, gen, per_set, names, first in arms:  # the product's selection (first: final_mix split's first draw)
        firsts = None if first is None else [[len(row) for row in rows] for rows in first]
        for sel in names:
            how = replace(WAYS[sel], split=first is not None, copy_filter=cfg.copy_filter)  # the product's filter
            name, t = prefix + sel, time.perf_counter()
            for d, got in select_sets(gen, per_set, dpcs, seeds, firsts, how).items():
                sets[d, name] = got
            record_sets(name, gen, t)
    for method in REAL:
        cs = CoresetConfig(method="herding" if method == "herding-real-data" else method, dpc=tuple(dpcs),
                           n_sets=args.sets, learner=cfg.learner, candidates_per_class=1000, seed=0, device="cpu",
                           halves=True)
        for d, got in build_coresets(task, cs, ctx.device).items():
            sets[d, method] = got
    soft = [m for m in args.soft.split(",") if m and (dpcs[0], m) in sets]
    if soft:
        labeler, t = SoftLabeler(task, SoftLabelConfig(), ctx.device), time.perf_counter()
        for m in soft:
            for d in dpcs:
                sets[d, m + "+soft"] = [labeler(s) for s in sets[d, m]]
        rec.cell("soft-labels", methods=soft, seconds=time.perf_counter() - t)
    methods = list(dict.fromkeys(m for _, m in sets))

    for judge in judges:
        ev = Evaluator(task, EvalConfig(archs=(judge,), seeds=1, device="cpu", progress=False))
        for d in dpcs:
            for m in methods:
                accs = [ev.evaluate([s]).summary()[judge]["accuracy"] for s in sets[d, m]]
                rec.cell(f"{judge}/dpc{d}/{m}", **summarise(accs))

    ft_dpcs = [int(d) for d in args.ft_dpc.split(",") if int(d)]
    if ft_dpcs:  # seed by seed, so that a run cut short has every method at the same seeds
        jobs = [(d, m, s, seed) for seed in range(args.seeds) for d in ft_dpcs for k in range(args.ft_sets)
                for m in args.ft_methods.split(",") if (d, m) in sets for s in sets[d, m][k: k + 1]]
        accs: dict[tuple[int, str], list[float]] = {(d, m): [] for d, m, _, _ in jobs}
        ctx_mp = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.workers, ctx_mp, _worker_init, (task.name, cfg.learner, args.ft_steps)) as pool:
            for (d, m, _, _), acc in zip(jobs, pool.map(_finetune, [(s, seed) for _, _, s, seed in jobs])):
                accs[d, m].append(acc)
                rec.cell(f"finetune/dpc{d}/{m}", **summarise(accs[d, m]))

    report(rec.path, rec.data)
    return 0


def report(path: Path, data: dict) -> None:
    """Paired differences of every cell written so far (into the JSON) and the table: the end of a run, or
    ``--report`` on the JSON of a run cut short."""
    cells, keys = data["cells"], [k.split("/") for k in data["cells"] if k.count("/") == 2]
    judges, dpcs, methods = (list(dict.fromkeys(x)) for x in zip(*keys))
    dpcs = sorted(int(d.removeprefix("dpc")) for d in dpcs)
    data["paired"] = {f"{j}/dpc{d}/{m}": {"best_coreset": best_coreset(cells, j, d),
                                          "vs_best_coreset": paired(cells, j, d, m, best_coreset(cells, j, d) or ""),
                                          "vs_random": paired(cells, j, d, m, "random"),
                                          "vs_kmeans": paired(cells, j, d, m, "kmeans"),
                                          "vs_twin": twin(m) and paired(cells, j, d, m, twin(m)),
                                          "vs_lm_pool": pool_twin(m) and paired(cells, j, d, m, pool_twin(m))}
                      for j in judges for d in dpcs for m in methods if f"{j}/dpc{d}/{m}" in cells}
    if "record" in data:  # --report: the run's own head stays
        write_json(path, data)
    else:
        write(path, data)
    print(markdown_table(cells, judges, dpcs, methods))


if __name__ == "__main__":
    raise SystemExit(main())
