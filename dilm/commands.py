"""The ``dilm`` sub-commands: for each, ``add_<name>(sub)`` builds its parser and ``cmd_<name>(args)`` builds a
config and calls the library. :func:`dilm.cli.build_parser` lists them; method modules know nothing of the CLI.

The options that set a config's fields are derived from the config dataclass (:mod:`dilm.options`): its defaults
and help are the only ones; here are only their spellings where they are not ``--kebab-name``, and the options that
are no config field (files, ``--evaluate``...)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dilm import DilmError
from dilm.archs import check_archs
from dilm.coreset import CoresetConfig, build_coresets
from dilm.device import pick_device
from dilm.distill import PRESETS, DistillConfig, distill, lm_cache_key, train_lm
from dilm.evaluate import EvalConfig, Evaluator
from dilm.files import write_json
from dilm.options import Flag, add_options, config_from_args, given, strs
from dilm.softlabel import SoftLabelConfig, SoftLabeler, select_fewer_than_classes
from dilm.synset import read_set, write_set
from dilm.tasks import REFERENCE_HELP, files_spec, load_task
from dilm.tdd import TDDConfig, distill_tdd, evaluate_tdd, load_tdd, save_tdd

# --------------------------------------------------------------------------- shared arguments

OUTPUT = ("-o", "--output")
# the unrolled learner's fields (UnrollConfig, the `unroll` of the soft-label and TDD configs) where their own
# names would clash with the outer loop's (steps, lr) or say too little
UNROLL_FLAGS = {"unroll.steps": "--unroll", "unroll.optimizer": "--inner-optimizer", "unroll.lr": "--inner-lr",
                "unroll.learn_lr": Flag(("--fixed-lr",), negate=True, help="do not learn the unroll step size")}


FILE_OPTIONS = {"text_column": "text", "label_column": "label", "text_pair_column": None, "label_names": None,
                "no_header": False, "description": ""}  # read with --train-file only


def add_task_args(p: argparse.ArgumentParser, title: str = "task", test: bool = True) -> None:
    """The task: a reference (``--task``: a packaged name, hf:NAME, a saved dataset folder, a spec file) or user
    files (``--train-file``; ``--task`` may then only name them). ``test``: the command reads a test split."""
    g = p.add_argument_group(title)
    g.add_argument("--task", help=f"the task: {REFERENCE_HELP}; with --train-file, only a name for the files")
    g.add_argument("--train-file", help="user training data: a path or storage URI (s3://...) of a .tsv, .csv, "
                                        ".jsonl or .parquet file (optionally .gz, .bz2, .xz)")
    if test:
        g.add_argument("--test-file", help="user test data, same format")
    g.add_argument("--text-column", help="column (or index) of the text (default: text)")
    g.add_argument("--text-pair-column", help="column of a pair's second text (default: none)")
    g.add_argument("--label-column", help="column of the label (default: label)")
    g.add_argument("--label-names", type=strs, help="comma-separated, in id order (default: the training file's "
                                                     "labels, sorted)")
    g.add_argument("--description", help="one line of what a text is (\"a customer support ticket\"): words the "
                                         "generator's prompt")
    g.add_argument("--no-header", action="store_true", default=None,
                   help="TSV/CSV files without a header row: give columns by index (--text-column 1), as CoLA ships")


def task_spec_from_args(args):
    """The task the options name (None where they name none); options for files without ``--train-file``,
    or ``--test-file`` alone, are one-line errors naming them."""
    given = {k: v for k in FILE_OPTIONS if (v := getattr(args, k, None)) is not None}
    if not args.train_file:
        if getattr(args, "test_file", None):
            raise DilmError("--test-file needs --train-file (or a --task that holds both splits)")
        if given:
            raise DilmError(f"{', '.join('--' + k.replace('_', '-') for k in given)} appl"
                            f"{'ies' if len(given) == 1 else 'y'} to --train-file data only")
        return args.task
    opts = {**FILE_OPTIONS, **given}
    return files_spec(args.task, args.train_file, getattr(args, "test_file", None), opts["text_column"],
                      opts["label_column"], opts["text_pair_column"], opts["label_names"], not opts["no_header"],
                      opts["description"])


def task_from_args(args, need_test: bool = True):
    spec = task_spec_from_args(args)
    if spec is None:
        raise DilmError(f"no task given; pass --task ({REFERENCE_HELP})")
    return load_task(spec, need_test=need_test)


# --------------------------------------------------------------------------- evaluate, coreset


def resolved(cfg: EvalConfig) -> EvalConfig:
    """``cfg``, once every ``--arch`` resolves as the evaluation will resolve it: a miss fails before any data is read
    (:mod:`dilm.protocol` cannot ask :mod:`dilm.archs`, which imports it)."""
    check_archs(cfg.archs, "--arch")
    return cfg


def cmd_evaluate(args) -> int:
    cfg = resolved(config_from_args(EvalConfig, args))
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
    cfg = config_from_args(CoresetConfig, args)
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
    add_options(e, EvalConfig, flags={"archs": "--arch"}, skip={"progress"}, title="evaluation (EvalConfig)")
    e.add_argument("--json", type=Path, help="write the scores here")
    e.set_defaults(func=cmd_evaluate)


def add_coreset(sub) -> None:
    c = sub.add_parser("coreset", help="random / k-centers / herding coresets of real data")
    add_task_args(c, test=False)  # selection reads the training split only
    add_options(c, CoresetConfig, title="selection (CoresetConfig)")
    c.add_argument(*OUTPUT, required=True, help="folder of the sets, METHOD_dpcD_setNN.jsonl")
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


def distill_config(args) -> DistillConfig:
    """The preset's values, then ``--set KEY=VALUE``, then the options given: an option left out never overrides
    the preset."""
    spec = task_spec_from_args(args)
    task = {} if spec is None else {"task": spec}
    return DistillConfig.from_preset(args.preset, **{**dict(args.set or []), **given(DistillConfig, args), **task})


def cmd_distill(args) -> int:
    cfg = distill_config(args)  # validated before any model loads
    cfg.check_models()
    ecfg = resolved(EvalConfig(archs=args.arch, seeds=args.eval_seeds, device=cfg.device)) if args.evaluate else None
    if args.lm_only:
        task = load_task(cfg.task)  # loaded and hashed once for the key and the LM stage
        key = lm_cache_key(cfg, task)
        print(f"LM-stage checkpoint (key {key}): {train_lm(cfg, task=task, key=key)}")
        return 0
    result = distill(cfg)
    for dpc, paths in result.sets.items():
        print(f"DPC {dpc}: {len(paths)} set(s) in {paths[0].parent}")
    print(f"provenance: {result.provenance}")
    if args.evaluate:
        task = load_task(cfg.task)
        ev = Evaluator(task, ecfg)
        scores = {}
        for dpc, paths in result.sets.items():
            scores[dpc] = ev.evaluate([read_set(p, task.label_names, task.is_pair) for p in paths]).summary()
            for arch, s in scores[dpc].items():
                print(f"DPC {dpc:>3} {arch:>14}: {s['accuracy']:.1f} ± {s['accuracy_std']:.1f} (n={s['n']})")
        write_json(Path(cfg.output_dir) / "scores.json", scores)
    return 0


def add_distill(sub) -> None:
    p = sub.add_parser("distill", help="distill a task into a generator and write synthetic sets (DiLM)",
                       description="Distill a task into a generator and write synthetic sets (DiLM). A preset sets "
                                   "many options at once; an option given here overrides it.")
    p.add_argument("--preset", default="gpu", choices=PRESETS,
                   help="smoke (CPU, tiny models), demo, gpu (one H100), paper: its values replace the defaults "
                        "listed below (default: gpu)")
    p.add_argument("--set", metavar="KEY=VALUE", type=_override, action="append",
                   help="set any option by its config name, e.g. --set outer_loops=0 (vanilla LM ablation)")
    p.add_argument("--lm-only", action="store_true", help="run only the LM stage; write the checkpoint to OUTPUT/lm")
    p.add_argument("--evaluate", action="store_true", help="evaluate the written sets afterwards")
    p.add_argument("--arch", type=strs, default=EvalConfig.archs, help="architectures --evaluate trains, "
                   f"comma-separated (default: {','.join(EvalConfig.archs)})")
    p.add_argument("--eval-seeds", type=int, default=1, help="training seeds per set of --evaluate (default: 1)")
    add_task_args(p)  # the task (default: the preset's, else sst2)
    add_options(p, DistillConfig, flags={"output_dir": OUTPUT}, skip={"task"},
                title="distillation (DistillConfig; a preset changes these defaults)")
    p.set_defaults(func=cmd_distill)


def add_orchestration(sub) -> None:
    # listed for --help only: dilm.cli.main hands `sweep` and `ui` to the tune package before parsing
    sub.add_parser("sweep", help="Ray Tune + Optuna sweep of distillations (dilm sweep --help)")
    sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for a sweep's tracking store (dilm ui --help)")


# --------------------------------------------------------------------------- softlabel


def cmd_softlabel(args) -> int:
    cfg = config_from_args(SoftLabelConfig, args, progress=True)
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
                   help="instead of SET: N real examples over all classes (k-means), fewer than the classes allowed "
                        "(default: none)")
    p.add_argument(*OUTPUT, required=True, type=Path, help="the labelled set (JSONL) and its .meta.json")
    p.add_argument("--evaluate-proxy", action="store_true",
                   help="score hard and soft labels by training the proxy itself with the learned step size")
    p.add_argument("--eval-seeds", type=int, default=5, help="proxies trained by --evaluate-proxy (default: 5)")
    p.add_argument("--test-limit", type=int, default=None,
                   help="--evaluate-proxy: first N test examples only (default: all)")
    add_options(p, SoftLabelConfig, flags=UNROLL_FLAGS, skip={"progress"}, title="soft labels (SoftLabelConfig)")
    p.set_defaults(func=cmd_softlabel)


# --------------------------------------------------------------------------- tdd


def cmd_tdd(args) -> int:
    cfg = config_from_args(TDDConfig, args, progress=True)  # validated (its learner resolved) before the data loads
    task = task_from_args(args)
    if args.existing is not None:
        tdd = load_tdd(args.existing)
        print(f"TDD set {args.existing}: {len(tdd)} sequences for {tdd.learner}")
    else:
        if args.output is None:
            raise DilmError("dilm tdd needs -o OUT (or an existing TDD set to evaluate)")
        tdd = distill_tdd(task, cfg)
        paths = save_tdd(tdd, args.output)
        print(f"TDD set: {len(tdd)} sequences × {tdd.inputs_embeds.shape[1]} embeddings → {paths['pt']} "
              f"(readings {paths['jsonl']}; outer loss {tdd.meta['outer_loss_first']} → {tdd.meta['outer_loss_last']})")
    if args.evaluate:
        ecfg = config_from_args(EvalConfig, args, prefix="eval.", archs=(args.arch or tdd.learner,),
                                device=cfg.device)
        s = evaluate_tdd(args.existing or tdd, task, args.arch or tdd.learner, ecfg).summary()
        for arch, v in s.items():
            print(f"{arch:>16}: accuracy {v['accuracy']:.1f} ± {v['accuracy_std']:.1f}  (n={v['n']})")
    return 0


def add_tdd(sub) -> None:
    p = sub.add_parser("tdd", help="embedding-level text distillation baseline (evaluable on its learner only)")
    p.add_argument("existing", nargs="?", type=Path, help="an existing TDD set (.pt) to evaluate instead")
    add_task_args(p)
    p.add_argument(*OUTPUT, type=Path, help="OUT → OUT.pt, OUT.jsonl (readings), OUT.meta.json")
    add_options(p, TDDConfig, flags=UNROLL_FLAGS, skip={"progress"}, title="TDD (TDDConfig)")
    eval_flags = {"eval.seeds": "--eval-seeds", "eval.steps": "--eval-steps", "eval.test_limit": "--test-limit"}
    e = add_options(p, EvalConfig, only={"seeds", "steps", "test_limit"}, prefix="eval.", flags=eval_flags,
                    title="evaluation (the protocol of dilm evaluate; EvalConfig)")
    e.add_argument("--evaluate", action="store_true", help="train fresh learners on the set; report test accuracy")
    e.add_argument("--arch", default=None, help="evaluation model (default and only valid choice: the learner)")
    p.set_defaults(func=cmd_tdd)
