"""Hard vs learned soft labels, and the TDD baseline, under the evaluation protocol: the README's soft-label table.

    python bench/softlabel_quality.py --json softlabel_quality.json     # GPU: minilm-l6, 10 sets x 5 seeds per cell
    python bench/softlabel_quality.py --quick                            # CPU smoke (~3 min): tiny-bert, 2 sets

Named baseline: every soft-label row is printed under its hard-label twin (the same texts, one-hot labels), and
"Δ" is soft − hard in accuracy points. AG News with fewer examples than classes (2 and 3 in total) is set against
the hard-label ceiling (a hard set of N examples predicts at most N classes, so it cannot beat the share of the N
largest test classes) and against random hard sets of N examples from N distinct classes (mean and best set).
TDD (embedding-level, evaluable on its own learner only) sits beside them at its DPC.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import asdict

import torch

from dilm.coreset import CoresetConfig, build_coresets
from dilm.evaluate import EvalConfig, Evaluator
from dilm.files import write_json
from dilm.models import pick_device
from dilm.softlabel import SoftLabelConfig, SoftLabeler, UnrollConfig, hard_label_ceiling, select_fewer_than_classes
from dilm.synset import SynSet
from dilm.tasks import TaskData, load_task
from dilm.tdd import TDDConfig, distill_tdd, evaluate_tdd

QUICK = dict(learner="tiny-bert", archs=("tiny-bert", "tfidf-logreg"), n_sets=2, seeds=1, dpc=(1, 5, 10),
             eval_steps=20, eval_max_length=64, test_limit=100, sl_steps=20, unroll=10, learners=2,
             real_per_class=100, candidates=200, tdd_sets=1, tdd_steps=5, seq_len=16, threads=1)
METHOD_NAMES = {"random": "random", "kcenters": "k-centers", "herding": "herding"}


def parse() -> argparse.Namespace:
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
    strs = lambda s: tuple(x for x in s.split(",") if x)  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny CPU scale: " + ", ".join(f"{k}={v}" for k, v in
                                                                                        QUICK.items()))
    p.add_argument("--tasks", type=strs, default=("sst2", "ag_news"))
    p.add_argument("--learner", default="minilm-l6", help="feature model, soft-label proxy, TDD learner")
    p.add_argument("--archs", type=strs, default=None, help="evaluation architectures (default: the learner)")
    p.add_argument("--methods", type=strs, default=("random", "kcenters"))
    p.add_argument("--dpc", type=ints, default=(1, 5, 10))
    p.add_argument("--n-sets", type=int, default=10, help="sets per cell")
    p.add_argument("--seeds", type=int, default=5, help="training seeds per set")
    p.add_argument("--eval-steps", type=int, default=200)
    p.add_argument("--eval-max-length", type=int, default=128, help="token limit in evaluation (protocol: 128)")
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--totals", type=ints, default=(2, 3), help="fewer-than-classes sizes (tasks with more classes)")
    p.add_argument("--candidates", type=int, default=2000, help="candidates per class for k-centers / k-means")
    p.add_argument("--mode", default="head", help="soft-label / TDD proxy: head or full")
    p.add_argument("--sl-steps", type=int, default=100, help="outer steps of soft-label learning")
    p.add_argument("--unroll", type=int, default=20)
    p.add_argument("--learners", type=int, default=4)
    p.add_argument("--real-per-class", type=int, default=500)
    p.add_argument("--tdd-dpc", type=ints, default=(1,))
    p.add_argument("--tdd-sets", type=int, default=3)
    p.add_argument("--tdd-steps", type=int, default=200)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (quick: 1: small unrolls are dispatch-bound; a busy 2-core box thrashes)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, v)
    a.archs = a.archs or (a.learner,)
    return a


def random_distinct_classes(task: TaskData, n: int, seed: int) -> SynSet:
    """A hard-label set of n examples from n distinct, randomly chosen classes."""
    rng = random.Random(seed)
    groups = task.by_class()
    return SynSet.from_examples([rng.choice(groups[c]) for c in rng.sample(range(task.num_classes), n)],
                                task.label_names, method="random-distinct-classes", total=n, seed=seed)


def cell_stats(accs: list[float], per_set: int) -> dict:
    """Mean ± std (%) over (set, seed) pairs, and the best set's mean."""
    xs = [100 * a for a in accs]
    sets = [statistics.fmean(xs[i: i + per_set]) for i in range(0, len(xs), per_set)]
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs),
            "best_set": max(sets)}


def build_cells(task: TaskData, a, labeler: SoftLabeler, device, timings: dict) -> dict[tuple, list[SynSet]]:
    """(group, labels, column) → sets. Groups: coreset methods, and "fewer" (fewer examples than classes)."""
    cells: dict[tuple, list[SynSet]] = {}
    sl_time, sl_sets = 0.0, 0
    for method in a.methods:
        cfg = CoresetConfig(method=method, dpc=a.dpc, n_sets=a.n_sets, learner=a.learner,
                            candidates_per_class=a.candidates)
        for dpc, sets in build_coresets(task, cfg, device).items():
            t = time.perf_counter()
            cells[(method, "hard", dpc)] = sets
            cells[(method, "soft", dpc)] = [labeler(s) for s in sets]
            sl_time, sl_sets = sl_time + time.perf_counter() - t, sl_sets + len(sets)
    for n in (n for n in a.totals if n < task.num_classes):
        picked = [select_fewer_than_classes(task, n, a.learner, seed=k, candidates_per_class=a.candidates // 4,
                                            device=device) for k in range(a.n_sets)]
        cells[("fewer", "hard", n)] = picked
        t = time.perf_counter()
        cells[("fewer", "soft", n)] = [labeler(s) for s in picked]
        sl_time, sl_sets = sl_time + time.perf_counter() - t, sl_sets + len(picked)
        cells[("fewer", "random-distinct-hard", n)] = [random_distinct_classes(task, n, k) for k in range(a.n_sets)]
    timings["soft_label_s_per_set"] = sl_time / max(1, sl_sets)
    return cells


def evaluate_cells(evaluator: Evaluator, cells: dict[tuple, list[SynSet]], seeds: int) -> dict[str, dict]:
    """One evaluation call over every set (full ensembles), split back into cells: arch → cell key → stats."""
    keys = list(cells)
    flat = [s for k in keys for s in cells[k]]
    by_arch = evaluator.evaluate(flat).by_arch
    out: dict[str, dict] = {}
    for arch, scores in by_arch.items():
        start = 0
        for k in keys:
            n = len(cells[k]) * seeds
            out.setdefault(arch, {})[k] = cell_stats(scores.accuracies[start: start + n], seeds)
            start += n
    return out


def run_tdd(task: TaskData, a, ucfg: UnrollConfig, device) -> dict[int, dict]:
    ecfg = EvalConfig(archs=(a.learner,), seeds=a.seeds, steps=a.eval_steps, max_length=a.eval_max_length,
                      test_limit=a.test_limit, device=str(device), progress=False)
    out = {}
    for dpc in a.tdd_dpc:
        accs = []
        for k in range(a.tdd_sets):
            tdd = distill_tdd(task, TDDConfig(dpc=dpc, seq_len=a.seq_len, steps=a.tdd_steps, seed=k, unroll=ucfg),
                              device)
            accs += evaluate_tdd(tdd, task, a.learner, ecfg).by_arch[a.learner].accuracies
        out[dpc] = cell_stats(accs, a.seeds)
    return out


def fmt(s: dict | None, twin: dict | None = None) -> str:
    if s is None:
        return ""
    delta = f" (Δ {s['mean'] - twin['mean']:+.1f})" if twin else ""
    return f"{s['mean']:.1f} ± {s['std']:.1f}{delta}"


def tables(results: dict, a) -> str:
    lines = []
    for arch in a.archs:
        lines += [f"### {arch}: test accuracy (%), mean ± std over (set, seed) pairs; Δ = soft − hard twin", "",
                  "| task | set | labels | " + " | ".join(f"DPC {d}" for d in a.dpc) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in a.dpc) + " |"]
        for task, r in results["tasks"].items():
            cells = r["scores"][arch]
            for method in a.methods:
                hard = [cells.get(f"{method}|hard|{d}") for d in a.dpc]
                soft = [cells.get(f"{method}|soft|{d}") for d in a.dpc]
                lines.append(f"| {task} | {METHOD_NAMES[method]} | hard | " + " | ".join(map(fmt, hard)) + " |")
                lines.append(f"| {task} | {METHOD_NAMES[method]} | soft (learned) | "
                             + " | ".join(fmt(s, h) for s, h in zip(soft, hard)) + " |")
            if arch == a.learner and r.get("tdd"):
                tdd = [r["tdd"].get(str(d)) for d in a.dpc]
                lines.append(f"| {task} | TDD, embeddings ({a.learner} only) | soft (learned) | "
                             + " | ".join(map(fmt, tdd)) + " |")
        lines.append("")
        for task, r in results["tasks"].items():
            totals = [n for n in a.totals if f"fewer|hard|{n}" in r["scores"][arch]]
            if not totals:
                continue
            c = r["scores"][arch]
            lines += [f"### {arch}, {task}: fewer examples than classes ({r['num_classes']} classes)", "",
                      "| set | " + " | ".join(f"{n} examples" for n in totals) + " |",
                      "| --- | " + " | ".join("---" for _ in totals) + " |",
                      "| k-means over all classes, hard labels | "
                      + " | ".join(fmt(c[f"fewer|hard|{n}"]) for n in totals) + " |",
                      "| same examples, learned soft labels | "
                      + " | ".join(fmt(c[f"fewer|soft|{n}"], c[f"fewer|hard|{n}"]) for n in totals) + " |",
                      "| random, N distinct classes, hard: mean / best set | "
                      + " | ".join(f"{c[f'fewer|random-distinct-hard|{n}']['mean']:.1f} / "
                                   f"{c[f'fewer|random-distinct-hard|{n}']['best_set']:.1f}" for n in totals) + " |",
                      "| hard-label ceiling (N largest test classes) | "
                      + " | ".join(f"{r['ceiling'][str(n)]:.1f}" for n in totals) + " |", ""]
    return "\n".join(lines)


def main() -> None:
    a = parse()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    t0 = time.perf_counter()
    ucfg = UnrollConfig(learner=a.learner, mode=a.mode, steps=a.unroll, learners=a.learners,
                        real_per_class=a.real_per_class)
    sl_cfg = SoftLabelConfig(steps=a.sl_steps, unroll=ucfg)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "args": vars(a),
               "soft_label_config": asdict(sl_cfg), "tasks": {}}
    for name in a.tasks:
        task = load_task(name)
        timings: dict = {}
        t = time.perf_counter()
        cells = build_cells(task, a, SoftLabeler(task, sl_cfg, device), device, timings)
        timings["sets_s"] = time.perf_counter() - t
        t = time.perf_counter()
        evaluator = Evaluator(task, EvalConfig(archs=a.archs, seeds=a.seeds, steps=a.eval_steps,
                                               max_length=a.eval_max_length, test_limit=a.test_limit,
                                               device=str(device), progress=not a.quick))
        scores = evaluate_cells(evaluator, cells, a.seeds)
        timings["evaluate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        tdd = run_tdd(task, a, ucfg, device) if a.tdd_sets else {}
        timings["tdd_s"] = time.perf_counter() - t
        results["tasks"][name] = {
            "num_classes": task.num_classes, "timings": timings,
            "ceiling": {str(n): hard_label_ceiling(task, n) for n in a.totals if n < task.num_classes},
            "scores": {arch: {"|".join(map(str, k)): v for k, v in cell.items()} for arch, cell in scores.items()},
            "tdd": {str(d): v for d, v in tdd.items()}}
        print(f"[{name}] sets {timings['sets_s']:.0f} s (soft labels {timings['soft_label_s_per_set']:.1f} s/set), "
              f"evaluation {timings['evaluate_s']:.0f} s, TDD {timings['tdd_s']:.0f} s", flush=True)
    results["wall_s"] = time.perf_counter() - t0
    print()
    print(tables(results, a))
    print(f"total {results['wall_s']:.0f} s on {results['device']}")
    if a.json:
        write_json(a.json, results)


if __name__ == "__main__":
    main()
