"""The ``dilm`` sub-commands: for each, ``add_<name>(sub)`` builds its parser and ``cmd_<name>(args)`` builds a
config and calls the library. :func:`dilm.cli.build_parser` lists them; method modules know nothing of the CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dilm import DilmError
from dilm.evaluate import EvalConfig
from dilm.features import EMBED_POOLINGS
from dilm.files import write_json
from dilm.models import pick_device
from dilm.softlabel import SoftLabelConfig, SoftLabeler, select_fewer_than_classes
from dilm.synset import read_set, write_set
from dilm.tdd import INITS, TDDConfig, distill_tdd, evaluate_tdd, load_tdd, save_tdd
from dilm.unroll import INNER_OPTIMIZERS, MODES, SCHEDULES, UnrollConfig

# --------------------------------------------------------------------------- shared arguments


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _strs(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def add_task_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task")
    g.add_argument("--task", help="packaged task (sst2, mrpc, ag_news), hf:DATASET, or a name for user files")
    g.add_argument("--train-file", help="user training data: .tsv, .csv or .jsonl (optionally .gz)")
    g.add_argument("--test-file", help="user test data, same format")
    g.add_argument("--text-column", default="text")
    g.add_argument("--text-pair-column", default=None)
    g.add_argument("--label-column", default="label")
    g.add_argument("--label-names", type=_strs, default=None, help="comma-separated, in id order")
    g.add_argument("--no-header", action="store_true",
                   help="TSV/CSV files without a header row: give columns by index (--text-column 1), as CoLA ships")


def task_from_args(args, need_test: bool = True):
    from dilm.tasks import load_task

    return load_task(args.task, train_file=args.train_file, test_file=args.test_file,
                     text_column=args.text_column, label_column=args.label_column,
                     text_pair_column=args.text_pair_column,
                     label_names=list(args.label_names) if args.label_names else None,
                     has_header=not args.no_header, need_test=need_test)


# --------------------------------------------------------------------------- evaluate, coreset


def cmd_evaluate(args) -> int:
    from dilm.evaluate import EvalConfig, Evaluator
    from dilm.files import write_json
    from dilm.synset import read_set

    cfg = EvalConfig(archs=args.arch, seeds=args.seeds, steps=args.steps, device=args.device,
                     test_limit=args.test_limit, ensemble=args.ensemble)
    task = task_from_args(args)
    sets = [read_set(p, task.label_names, task.is_pair) for p in args.sets]
    evaluator = Evaluator(task, cfg)
    summary = evaluator.evaluate(sets).summary()
    for arch, s in summary.items():
        f1 = f"  F1 {s['f1']:.1f} ± {s['f1_std']:.1f}" if "f1" in s else ""
        print(f"{arch:>16}: accuracy {s['accuracy']:.1f} ± {s['accuracy_std']:.1f}  (n={s['n']}){f1}")
        if "note" in s:
            print(f"{'':>16}  ({s['note']})")
    if args.json:
        write_json(args.json, {"task": task.name, "sets": [str(p) for p in args.sets], "scores": summary})
    return 0


def cmd_coreset(args) -> int:
    from dilm.coreset import CoresetConfig, build_coresets
    from dilm.models import pick_device
    from dilm.synset import write_set

    cfg = CoresetConfig(method=args.method, dpc=args.dpc, n_sets=args.n_sets, learner=args.learner,
                        pooling=args.pooling, seed=args.seed, device=args.device,
                        candidates_per_class=args.candidates_per_class or None)
    task = task_from_args(args, need_test=False)  # selection reads the training split only
    out = Path(args.output)
    for dpc, sets in build_coresets(task, cfg, pick_device(cfg.device)).items():
        for i, s in enumerate(sets):
            path = write_set(out / f"{cfg.method}_dpc{dpc}_set{i:02d}.jsonl", s)
        print(f"DPC {dpc}: {len(sets)} set(s) → {path.parent}")
    return 0


def add_evaluate(sub) -> None:
    e = sub.add_parser("evaluate", help="train fresh learners on synthetic sets and report test accuracy")
    e.add_argument("sets", nargs="+", type=Path, help="JSONL synthetic sets")
    add_task_args(e)
    e.add_argument("--arch", type=_strs, default=("minilm-l6",),
                   help="comma-separated: model names, tfidf-logreg, icl-smollm2 / icl-MODEL")
    e.add_argument("--seeds", type=int, default=5, help="training seeds per set")
    e.add_argument("--steps", type=int, default=200)
    e.add_argument("--ensemble", type=int, default=16, help="learners trained at once (vmap)")
    e.add_argument("--test-limit", type=int, default=None, help="only the first N test examples (smoke)")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", type=Path, help="write the scores here")
    e.set_defaults(func=cmd_evaluate)


def add_coreset(sub) -> None:
    c = sub.add_parser("coreset", help="random / k-centers / herding coresets of real data")
    add_task_args(c)
    c.add_argument("--method", default="random")
    c.add_argument("--dpc", type=_ints, default=(5, 10, 20))
    c.add_argument("--n-sets", type=int, default=20)
    c.add_argument("--learner", default="minilm-l6", help="feature model for kcenters/herding")
    c.add_argument("--pooling", default="mean", help="mean or cls")
    c.add_argument("--candidates-per-class", type=int, default=2000, help="0 = the whole class")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="auto")
    c.add_argument("-o", "--output", required=True)
    c.set_defaults(func=cmd_coreset)


# --------------------------------------------------------------------------- distill


def _override(s: str) -> tuple[str, object]:
    """``key=value`` with the value parsed as JSON when possible (numbers, booleans, lists)."""
    key, sep, value = s.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected key=value, got {s!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def cmd_distill(args) -> int:
    from dilm.distill import DistillConfig, distill

    overrides = dict(args.set or [])
    overrides.update(task=args.task or "sst2", output_dir=str(args.output), seed=args.seed, device=args.device)
    if args.dpc:
        overrides["dpc"] = args.dpc
    for key in ("lm_checkpoint", "prompt_template"):
        if getattr(args, key) is not None:
            overrides[key] = str(getattr(args, key))
    cfg = DistillConfig.from_preset(args.preset, **overrides)  # validated before any model loads
    if args.lm_only:
        from dilm.distill import lm_cache_key, train_lm

        print(f"LM-stage checkpoint (key {lm_cache_key(cfg)}): {train_lm(cfg)}")
        return 0
    result = distill(cfg)
    for dpc, paths in result.sets.items():
        print(f"DPC {dpc}: {len(paths)} set(s) in {paths[0].parent}")
    print(f"provenance: {result.provenance}")
    if args.evaluate:
        from dilm.evaluate import EvalConfig, Evaluator
        from dilm.files import write_json
        from dilm.synset import read_set

        task = task_from_args(args)
        ev = Evaluator(task, EvalConfig(archs=args.arch, seeds=args.eval_seeds, device=args.device))
        scores = {}
        for dpc, paths in result.sets.items():
            scores[dpc] = ev.evaluate([read_set(p, task.label_names, task.is_pair) for p in paths]).summary()
            for arch, s in scores[dpc].items():
                print(f"DPC {dpc:>3} {arch:>14}: {s['accuracy']:.1f} ± {s['accuracy_std']:.1f} (n={s['n']})")
        write_json(Path(args.output) / "scores.json", scores)
    return 0


def add_distill(sub) -> None:
    p = sub.add_parser("distill", help="distill a task into a generator and write synthetic sets (DiLM)")
    add_task_args(p)
    p.add_argument("--preset", default="gpu", help="smoke (CPU, tiny models), demo, gpu (one H100), paper")
    p.add_argument("--dpc", type=_ints, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--set", metavar="KEY=VALUE", type=_override, action="append",
                   help="override any distill option, e.g. --set outer_loops=0 (vanilla LM ablation)")
    p.add_argument("--prompt-template", default=None,
                   help="generator prompt: task (the packaged task's own, default), label (label: <name>\\ntext:), "
                        "or a template with {label}, e.g. 'Here is one short {label} product review:'")
    p.add_argument("--lm-checkpoint", type=Path, default=None,
                   help="start matching from this LM-stage checkpoint (OUTPUT/lm of a --lm-only run), no LM stage")
    p.add_argument("--lm-only", action="store_true", help="run only the LM stage; write the checkpoint to OUTPUT/lm")
    p.add_argument("--evaluate", action="store_true", help="evaluate the written sets afterwards")
    p.add_argument("--arch", type=_strs, default=("minilm-l6",))
    p.add_argument("--eval-seeds", type=int, default=1)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(func=cmd_distill)


def add_orchestration(sub) -> None:
    # listed for --help only: dilm.cli.main hands `sweep` and `ui` to the tune package before parsing
    sub.add_parser("sweep", help="Ray Tune + Optuna sweep of distillations (dilm sweep --help)")
    sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for a sweep's tracking store (dilm ui --help)")


# --------------------------------------------------------------------------- softlabel


def add_unroll_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("unrolled learner")
    g.add_argument("--learner", default="minilm-l6")
    g.add_argument("--mode", default="head", choices=MODES,
                   help="head: linear head on frozen features (fast, default); full: the whole model")
    g.add_argument("--pooling", default="pooler", choices=EMBED_POOLINGS,
                   help="head-mode features; pooler: the classifier's own [CLS] pooler, what evaluation trains on")
    g.add_argument("--unroll", type=int, default=20, help="differentiable learner steps per outer step")
    g.add_argument("--inner-optimizer", default="sgd", choices=INNER_OPTIMIZERS)
    g.add_argument("--schedule", default="constant", choices=SCHEDULES,
                   help="unroll step size: constant, or protocol (warm-up over half, then decay)")
    g.add_argument("--inner-lr", type=float, default=None, help="unroll step size (default by mode/optimizer)")
    g.add_argument("--fixed-lr", action="store_true", help="do not learn the unroll step size")
    g.add_argument("--learners", type=int, default=4, help="fresh learner initialisations per outer step")
    g.add_argument("--real-per-class", type=int, default=500)
    g.add_argument("--real-batch", type=int, default=256)
    g.add_argument("--max-length", type=int, default=128, help="token limit (the evaluation protocol's: 128)")


def unroll_config_from_args(args) -> UnrollConfig:
    return UnrollConfig(learner=args.learner, mode=args.mode, pooling=args.pooling, steps=args.unroll,
                        optimizer=args.inner_optimizer, schedule=args.schedule, lr=args.inner_lr,
                        learn_lr=not args.fixed_lr,
                        learners=args.learners, real_per_class=args.real_per_class, real_batch=args.real_batch,
                        max_length=args.max_length)


def cmd_softlabel(args) -> int:
    cfg = SoftLabelConfig(steps=args.steps, lr=args.lr, max_shift=args.max_shift, init_smoothing=args.init_smoothing,
                          weights=args.weights, max_weight=args.max_weight, seed=args.seed, device=args.device,
                          unroll=unroll_config_from_args(args), progress=True)
    if (args.set is None) == (args.total is None):
        raise DilmError("give either a SET.jsonl or --total N")
    task = task_from_args(args)
    device = pick_device(cfg.device)
    if args.set is not None:
        synset = read_set(args.set, task.label_names, task.is_pair)
    else:
        synset = select_fewer_than_classes(task, args.total, cfg.unroll.learner, cfg.seed, cfg.unroll.pooling,
                                           device=device)
    labeler = SoftLabeler(task, cfg, device)
    out = labeler(synset)
    write_set(args.output, out)
    write_json(Path(args.output).with_suffix(".meta.json"),
               {**out.meta, "source": str(args.set) if args.set else f"--total {args.total}", "task": task.name})
    m = out.meta["soft_label"]
    trail = (f" (outer loss {m['outer_loss_first']:.3f} → {m['outer_loss_last']:.3f}, "
             f"learned unroll lr {m['learned_lr']:.3g})" if cfg.steps else "")
    print(f"soft labels for {len(out)} examples → {args.output}{trail}")
    if args.evaluate_proxy:  # the paper's setting: the proxy itself, trained with the learned step size
        test = task.test[: args.test_limit] if args.test_limit else task.test
        for name, s in (("hard labels", synset), ("soft labels", out)):
            accs = 100 * np.array(labeler.proxy_accuracy(s, args.eval_seeds, test, m.get("learned_lr")))
            print(f"proxy ({cfg.unroll.mode}, {cfg.unroll.pooling}, learned lr), {name}: accuracy "
                  f"{accs.mean():.1f} ± {accs.std(ddof=1) if len(accs) > 1 else 0.0:.1f} (n={len(accs)})")
    return 0


def add_softlabel(sub) -> None:
    p = sub.add_parser("softlabel", help="learn soft labels for a set by unrolled learner training")
    p.add_argument("set", nargs="?", type=Path, help="JSONL set (coreset, DiLM set…); omit with --total")
    add_task_args(p)
    p.add_argument("--total", type=int, default=None,
                   help="instead of SET: N real examples over all classes (k-means), fewer than the classes allowed")
    p.add_argument("--steps", type=int, default=100, help="outer steps")
    p.add_argument("--lr", type=float, default=0.05, help="outer Adam step size")
    p.add_argument("--max-shift", type=float, default=0.5,
                   help="most total-variation distance a label may move from its start (1: free)")
    p.add_argument("--init-smoothing", type=float, default=0.0, help="labels start at (1-s)*onehot + s/C")
    p.add_argument("--weights", action="store_true", help="learn a per-example weight on the label distribution")
    p.add_argument("--max-weight", type=float, default=4.0, help="weights stay in [1/max_weight, max_weight]")
    p.add_argument("--evaluate-proxy", action="store_true",
                   help="score hard and soft labels by training the proxy itself with the learned step size")
    p.add_argument("--eval-seeds", type=int, default=5)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    add_unroll_args(p)
    p.add_argument("-o", "--output", required=True, type=Path)
    p.set_defaults(func=cmd_softlabel)


# --------------------------------------------------------------------------- tdd


def cmd_tdd(args) -> int:
    task = task_from_args(args)
    if args.existing is not None:
        tdd = load_tdd(args.existing)
        print(f"TDD set {args.existing}: {len(tdd)} sequences for {tdd.learner}")
    else:
        cfg = TDDConfig(dpc=args.dpc, seq_len=args.seq_len, steps=args.steps, lr=args.lr, label_lr=args.label_lr,
                        total=args.total, max_shift=args.max_shift, init_smoothing=args.init_smoothing, init=args.init,
                        seed=args.seed, device=args.device,
                        unroll=unroll_config_from_args(args), progress=True)
        if args.output is None:
            raise DilmError("dilm tdd needs -o OUT (or an existing TDD set to evaluate)")
        tdd = distill_tdd(task, cfg)
        paths = save_tdd(tdd, args.output)
        print(f"TDD set: {len(tdd)} sequences × {tdd.inputs_embeds.shape[1]} embeddings → {paths['pt']} "
              f"(readings {paths['jsonl']}; outer loss {tdd.meta['outer_loss_first']} → {tdd.meta['outer_loss_last']})")
    if args.evaluate:
        ecfg = EvalConfig(archs=(args.arch or tdd.learner,), seeds=args.eval_seeds, steps=args.eval_steps,
                          test_limit=args.test_limit, device=args.device)
        s = evaluate_tdd(args.existing or tdd, task, args.arch or tdd.learner, ecfg).summary()
        for arch, v in s.items():
            print(f"{arch:>16}: accuracy {v['accuracy']:.1f} ± {v['accuracy_std']:.1f}  (n={v['n']})")
    return 0


def add_tdd(sub) -> None:
    p = sub.add_parser("tdd", help="embedding-level text distillation baseline (evaluable on its learner only)")
    p.add_argument("existing", nargs="?", type=Path, help="an existing TDD set (.pt) to evaluate instead")
    add_task_args(p)
    p.add_argument("--dpc", type=int, default=1)
    p.add_argument("--total", type=int, default=None,
                   help="instead of --dpc: N sequences over all classes (fewer than the classes allowed)")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=200, help="outer steps")
    p.add_argument("--lr", type=float, default=0.05, help="embedding step, in units of the table's std")
    p.add_argument("--label-lr", type=float, default=0.05)
    p.add_argument("--max-shift", type=float, default=1.0, help="most total-variation distance a label may move")
    p.add_argument("--init-smoothing", type=float, default=0.0, help="labels start at (1-s)*onehot + s/C")
    p.add_argument("--init", default="real", choices=INITS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    add_unroll_args(p)
    p.add_argument("-o", "--output", type=Path, help="OUT → OUT.pt, OUT.jsonl (readings), OUT.meta.json")
    e = p.add_argument_group("evaluation (protocol of dilm evaluate)")
    e.add_argument("--evaluate", action="store_true", help="train fresh learners on the set; report test accuracy")
    e.add_argument("--arch", default=None, help="evaluation model (default and only valid choice: the learner)")
    e.add_argument("--eval-seeds", type=int, default=5)
    e.add_argument("--eval-steps", type=int, default=200)
    e.add_argument("--test-limit", type=int, default=None)
    p.set_defaults(func=cmd_tdd)
