"""Sub-commands beyond evaluate/coreset, registered on the parser of :mod:`dilm.cli`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dilm.cli import add_task_args, command, task_from_args


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


@command
def add_distill(sub) -> None:
    from dilm.cli import _ints, _strs

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


@command
def add_orchestration(sub) -> None:
    # listed for --help only: dilm.cli.main hands `sweep` and `ui` to the tune package before parsing
    sub.add_parser("sweep", help="Ray Tune + Optuna sweep of distillations (dilm sweep --help)")
    sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for a sweep's tracking store (dilm ui --help)")


import dilm.softlabel  # noqa: E402,F401  (registers softlabel)
import dilm.tdd  # noqa: E402,F401  (registers tdd)
