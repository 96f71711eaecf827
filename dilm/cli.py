"""The ``dilm`` command: thin wrappers that build a config and call the library.

``dilm sweep`` and ``dilm ui`` hand over to the ``tune`` package (imported only when those commands run), so the
method code in ``dilm`` never imports Ray.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dilm import DilmError


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dilm", description="Text dataset distillation into a language model (DiLM).")
    sub = p.add_subparsers(dest="command", required=True)

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

    for extra in _EXTRA_COMMANDS:
        extra(sub)
    return p


_EXTRA_COMMANDS: list = []


def command(fn):
    """Register a function that adds a sub-command to the parser."""
    _EXTRA_COMMANDS.append(fn)
    return fn


def _handover(argv: list[str]) -> int | None:
    """``dilm sweep ...`` / ``dilm ui ...``: the tune package parses its own arguments (Ray enters only here)."""
    if argv and argv[0] == "sweep":
        from tune.sweep import main as sweep_main

        return sweep_main(argv[1:])
    if argv and argv[0] == "ui":
        from tune.tracking import ui_main

        return ui_main(argv[1:])
    return None


def main(argv: list[str] | None = None) -> int:
    import dilm.commands  # noqa: F401  (registers distill, softlabel, tdd and the sweep/ui entries of --help)

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        handed = _handover(argv)
        if handed is not None:
            return handed
        args = build_parser().parse_args(argv)
        return args.func(args)
    except DilmError as e:
        print(f"dilm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dilm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # `python -m dilm.cli`: use the importable module, where sub-commands register
    from dilm.cli import main as _main

    sys.exit(_main())
