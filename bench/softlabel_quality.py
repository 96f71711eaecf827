"""Do learned soft labels help, and is it the learning that helps? The README's soft-label table.

    python bench/softlabel_quality.py --json softlabel.json      # GPU: 20 sets x 5 seeds, learner + SmolLM2 + TF-IDF
    nice python bench/softlabel_quality.py --cpu --generated vanilla=DIR --generated dilm=DIR   # CPU scale (README)

For every set (same texts throughout) four labelings are trained on, each with the same training seeds:

* ``hard``    — the set as it is (one-hot);
* ``soft``    — learned soft labels (:mod:`dilm.softlabel`, the default proxy: a head on the classifier's own
  [CLS] pooler at 128 tokens);
* ``smooth``  — label smoothing at the soft twin's mean confidence (mean largest probability): is it only
  "less confident labels"?
* ``teacher`` — the distributions of a logistic-regression probe fitted on the same real pool the soft labels
  were learned from (the same features): is it only "knowledge from the real pool"?
* ``soft-mean`` (``--mean-proxy``) — soft labels learned with the previous default proxy (mean-pooled features,
  64 tokens), to see what matching the evaluated learner's pooling and token limit changes.

Architectures: fine-tuned models by the protocol (the learner, ``smollm2-135m``), ``tfidf-logreg``, and
``proxy`` — the paper's own setting: fresh proxy heads trained by the unroll (the learned step size for soft
labels, the configured one otherwise). Every figure is paired over (set, seed): Δ = labeling − hard (and
soft − smooth, soft − teacher) with a 95 % Student-t interval over the pairs.

Sources: ``random`` and ``kcenters`` coresets (built here), and generated sets (``--generated NAME=DIR``: the
``dpc<D>/*.jsonl`` or ``*dpc<D>*.jsonl`` under DIR, e.g. a ``dilm distill`` output and its ``outer_loops=0``
"vanilla LM" twin). Optional: AG News with fewer examples than classes (``--totals``) and TDD (``--tdd-sets``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from record import write  # bench/, beside this script

from dilm.coreset import CoresetConfig, build_coresets
from dilm.device import pick_device
from dilm.evaluate import Evaluator
from dilm.labelspace import Teacher, mean_confidence, smoothed_twin
from dilm.protocol import EvalConfig
from dilm.softlabel import SoftLabelConfig, SoftLabeler, hard_label_ceiling, select_fewer_than_classes
from dilm.stats import format_interval, paired_interval, summary
from dilm.synset import SynSet, read_set
from dilm.tasks import TaskData, load_task
from dilm.tdd import TDDConfig, distill_tdd, evaluate_tdd
from dilm.text import join_pair
from dilm.unroll import HeadProxy, UnrollConfig, syn_inputs

PROXY = "proxy"
CPU_SCALE = dict(tasks=("sst2",), archs=("tfidf-logreg", PROXY), dpc=(10,), n_sets=3, seeds=3, candidates=200,
                 totals=(), tdd_sets=0, threads=2, mean_proxy=True)
CONTRASTS = (("soft", "hard"), ("smooth", "hard"), ("teacher", "hard"), ("soft", "smooth"), ("soft", "teacher"),
             ("soft-mean", "hard"), ("soft", "soft-mean"))


def arguments() -> argparse.Namespace:
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
    strs = lambda s: tuple(x for x in s.split(",") if x)  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="CPU scale: " + ", ".join(f"{k}={v}" for k, v in
                                                                                CPU_SCALE.items()))
    p.add_argument("--tasks", type=strs, default=("sst2",))
    p.add_argument("--learner", default="minilm-l6", help="feature model, soft-label proxy, TDD learner")
    p.add_argument("--archs", type=strs, default=None,
                   help=f"evaluation architectures (default: the learner, smollm2-135m, tfidf-logreg, {PROXY})")
    p.add_argument("--methods", type=strs, default=("random", "kcenters"))
    p.add_argument("--generated", action="append", default=[], metavar="NAME=DIR",
                   help="generated sets as a source (repeatable): vanilla=runs/vanilla dilm=runs/dilm")
    p.add_argument("--dpc", type=ints, default=(5, 10, 20))
    p.add_argument("--n-sets", type=int, default=20, help="sets per source and DPC")
    p.add_argument("--seeds", type=int, default=5, help="training seeds per set")
    p.add_argument("--eval-steps", type=int, default=200)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--candidates", type=int, default=2000, help="candidates per class for k-centers / k-means")
    p.add_argument("--mode", default="head", help="soft-label / TDD proxy: head or full")
    p.add_argument("--pooling", default="pooler")
    p.add_argument("--sl-steps", type=int, default=100, help="outer steps of soft-label learning")
    p.add_argument("--max-shift", type=float, default=0.5)
    p.add_argument("--unroll", type=int, default=20)
    p.add_argument("--learners", type=int, default=4)
    p.add_argument("--real-per-class", type=int, default=500)
    p.add_argument("--mean-proxy", action="store_true", help="also the soft-mean labeling (previous proxy)")
    p.add_argument("--totals", type=ints, default=(), help="fewer-than-classes sizes (tasks with more classes)")
    p.add_argument("--tdd-dpc", type=ints, default=(1,))
    p.add_argument("--tdd-sets", type=int, default=0)
    p.add_argument("--tdd-steps", type=int, default=200)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.cpu:
        for k, v in CPU_SCALE.items():
            if p.get_default(k) == getattr(a, k):  # explicit options win over the CPU scale
                setattr(a, k, v)
    a.archs = a.archs or (a.learner, "smollm2-135m", "tfidf-logreg", PROXY)
    a.generated = dict(g.split("=", 1) for g in a.generated)
    return a


def generated_sets(task: TaskData, root: str, dpc: int, n: int) -> list[SynSet]:
    """The first ``n`` sets of DPC ``dpc`` under ``root`` (``dpc<D>/*.jsonl`` or ``*dpc<D>_*.jsonl``)."""
    paths = sorted(Path(root).rglob(f"dpc{dpc}/*.jsonl")) or sorted(Path(root).rglob(f"*dpc{dpc}_*.jsonl"))
    return [read_set(p, task.label_names, task.is_pair) for p in paths[:n]]


def sources(task: TaskData, a, device) -> dict[tuple[str, int], list[SynSet]]:
    """(source, DPC or total) → hard sets."""
    out: dict[tuple[str, int], list[SynSet]] = {}
    for method in a.methods:
        cfg = CoresetConfig(method=method, dpc=a.dpc, n_sets=a.n_sets, learner=a.learner,
                            candidates_per_class=a.candidates)
        for dpc, sets in build_coresets(task, cfg, device).items():
            out[(method, dpc)] = sets
    for name, root in a.generated.items():
        for dpc in a.dpc:
            sets = generated_sets(task, root, dpc, a.n_sets)
            if sets:
                out[(name, dpc)] = sets
            else:
                print(f"[{task.name}] no DPC {dpc} sets under {root} for source {name}", flush=True)
    for n in (n for n in a.totals if n < task.num_classes):
        out[("fewer", n)] = [select_fewer_than_classes(task, n, a.learner, seed=k, pooling=a.pooling,
                                                       candidates_per_class=a.candidates // 4, device=device)
                             for k in range(a.n_sets)]
    return out


def features(labeler: SoftLabeler, texts: list[str]) -> np.ndarray:
    """The proxy's (standardised) features of texts: the teacher probe's inputs."""
    return syn_inputs(labeler.proxy, texts, labeler.cfg.unroll, labeler.device, labeler._body).cpu().numpy()


def labelings(hard: SynSet, labeler: SoftLabeler, teacher: Teacher, mean_labeler: SoftLabeler | None) -> dict:
    soft = labeler(hard)
    out = {"hard": hard, "soft": soft, "smooth": smoothed_twin(hard, mean_confidence(soft)),
           "teacher": teacher.label(hard, features(labeler, [join_pair(e.text, e.text_pair) for e in hard.examples]))}
    if mean_labeler is not None:
        out["soft-mean"] = mean_labeler(hard)
    return out


def evaluate_all(task: TaskData, cells: dict, a, labeler: SoftLabeler, device) -> dict:
    """arch → (source, dpc, labeling) → accuracies (%) in (set, seed) order, paired across labelings."""
    keys = list(cells)
    flat = [s for k in keys for s in cells[k]]
    out: dict[str, dict] = {}
    archs = [x for x in a.archs if x != PROXY]
    if archs:
        ev = Evaluator(task, EvalConfig(archs=tuple(archs), seeds=a.seeds, steps=a.eval_steps,
                                        test_limit=a.test_limit, device=str(device), progress=False))
        for arch, scores in ev.evaluate(flat).by_arch.items():
            accs, start = scores.accuracies, 0
            for k in keys:
                n = len(cells[k]) * a.seeds
                out.setdefault(arch, {})[k] = [100 * x for x in accs[start: start + n]]
                start += n
    if PROXY in a.archs:
        test = task.test[: a.test_limit] if a.test_limit else task.test
        for k in keys:  # the learned step size goes with the soft labels it was learned with
            lr = None if k[2] == "soft" else labeler.cfg.unroll.lr
            out.setdefault(PROXY, {})[k] = [100 * x for s in cells[k]
                                            for x in labeler.proxy_accuracy(s, a.seeds, test, lr)]
    return out


def run_tdd(task: TaskData, a, ucfg: UnrollConfig, device) -> dict[int, list[float]]:
    ecfg = EvalConfig(archs=(a.learner,), seeds=a.seeds, steps=a.eval_steps, test_limit=a.test_limit,
                      device=str(device), progress=False)
    out = {}
    for dpc in a.tdd_dpc:
        out[dpc] = [100 * x for k in range(a.tdd_sets) for x in evaluate_tdd(
            distill_tdd(task, TDDConfig(dpc=dpc, steps=a.tdd_steps, seed=k, unroll=ucfg), device), task, a.learner,
            ecfg).by_arch[a.learner].accuracies]
    return out


def ms(xs: list[float]) -> str:
    s = summary(xs)
    return f"{s['mean']:.1f} ± {s['std']:.1f}"


def contrasts(accs: dict[str, list[float]]) -> dict[str, dict]:
    return {f"{x}-{y}": paired_interval([p - q for p, q in zip(accs[x], accs[y], strict=True)])
            for x, y in CONTRASTS if x in accs and y in accs}


def tables(results: dict) -> str:
    lines = []
    for task, r in results["tasks"].items():
        for arch, rows in r["scores"].items():
            names = [f"{x} − {y}" for x, y in CONTRASTS if any(f"{x}-{y}" in v["paired"] for v in rows.values())]
            lines += [f"### {task}, {arch}: accuracy (%) of the hard sets (mean ± std); paired Δ (points) with "
                      "95 % interval over (set, seed) pairs", "",
                      "| source | DPC | n | hard | " + " | ".join(names) + " |",
                      "| --- | --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
            for key, v in rows.items():
                src, dpc = key.split("|")
                lines.append(f"| {src} | {dpc} | {len(v['acc']['hard'])} | {ms(v['acc']['hard'])} | "
                             + " | ".join(format_interval(v["paired"][n.replace(' − ', '-')]) for n in names) + " |")
            lines.append("")
        if r.get("tdd"):
            lines += [f"TDD ({task}, embeddings, {results['args']['learner']} only): "
                      + ", ".join(f"DPC {d}: {ms(x)}" for d, x in r["tdd"].items()), ""]
        if r.get("ceiling"):
            lines += [f"hard-label ceiling ({task}, N largest test classes): "
                      + ", ".join(f"{n} examples {c:.1f}" for n, c in r["ceiling"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    a = arguments()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    t0 = time.perf_counter()
    ucfg = UnrollConfig(learner=a.learner, mode=a.mode, pooling=a.pooling, steps=a.unroll, learners=a.learners,
                        real_per_class=a.real_per_class)
    sl_cfg = SoftLabelConfig(steps=a.sl_steps, max_shift=a.max_shift, unroll=ucfg)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "args": vars(a),
               "soft_label_config": asdict(sl_cfg), "tasks": {}}
    for name in a.tasks:
        task = load_task(name)
        timings: dict = {}
        t = time.perf_counter()
        labeler = SoftLabeler(task, sl_cfg, device)
        mean_labeler = SoftLabeler(task, replace(sl_cfg, unroll=replace(ucfg, pooling="mean", max_length=64)),
                                   device) if a.mean_proxy else None
        if not isinstance(labeler.proxy, HeadProxy):
            raise SystemExit("this bench runs the head proxy (--mode head): its teacher control and proxy column "
                             "use the head's features; learn full-mode labels with `dilm softlabel --mode full`")
        proxy = labeler.proxy
        teacher = Teacher(proxy.real.cpu().numpy(), proxy.real_labels.cpu().numpy(), seed=0)
        hard = sources(task, a, device)
        timings["sets_s"] = time.perf_counter() - t
        t = time.perf_counter()
        cells = {}
        for (src, dpc), sets in hard.items():
            per = [labelings(s, labeler, teacher, mean_labeler) for s in sets]
            for lab in per[0]:
                cells[(src, dpc, lab)] = [p[lab] for p in per]
            print(f"[{name}] labelled {src} DPC {dpc}: {len(sets)} sets, mean soft confidence "
                  f"{statistics.fmean(mean_confidence(p['soft']) for p in per):.3f}, "
                  f"{time.perf_counter() - t:.0f} s so far", flush=True)
        timings["labels_s"] = time.perf_counter() - t
        t = time.perf_counter()
        accs = evaluate_all(task, cells, a, labeler, device)
        timings["evaluate_s"] = time.perf_counter() - t
        scores = {}
        for arch, per in accs.items():
            for (src, dpc) in hard:
                by_lab = {lab: v for (s, d, lab), v in per.items() if (s, d) == (src, dpc)}
                scores.setdefault(arch, {})[f"{src}|{dpc}"] = {"acc": by_lab, "paired": contrasts(by_lab)}
        t = time.perf_counter()
        tdd = run_tdd(task, a, ucfg, device) if a.tdd_sets else {}
        timings["tdd_s"] = time.perf_counter() - t
        results["tasks"][name] = {
            "num_classes": task.num_classes, "timings": timings, "scores": scores, "tdd": tdd,
            "ceiling": {str(n): hard_label_ceiling(task, n) for n in a.totals if n < task.num_classes}}
        print(f"[{name}] " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), flush=True)
        if a.json:  # after every task: a cut-short run keeps what it measured
            write(a.json, results)
    results["wall_s"] = time.perf_counter() - t0
    print()
    print(tables(results))
    print(f"total {results['wall_s']:.0f} s on {results['device']}")
    if a.json:
        write(a.json, results)


if __name__ == "__main__":
    main()
