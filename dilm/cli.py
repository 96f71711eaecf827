"""The ``dilm`` command: one parser listing every sub-command of :mod:`dilm.commands` (where each builds a config and
calls the library), and the entry point. Nothing registers itself here.

``dilm sweep`` and ``dilm ui`` hand over to the ``tune`` package (imported only when those commands run), so the
method code in ``dilm`` never imports Ray.
"""

from __future__ import annotations

import sys

from dilm import DilmError, commands
from dilm.options import Parser


def build_parser() -> Parser:
    p = Parser(prog="dilm", description="Text dataset distillation into a language model (DiLM).")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (commands.add_evaluate, commands.add_coreset, commands.add_distill, commands.add_orchestration,
                commands.add_softlabel, commands.add_tdd):
        add(sub)
    return p


def _handover(argv: list[str]) -> int | None:
    """``dilm sweep ...`` / ``dilm ui ...``: the tune package parses its own arguments (Ray enters only here)."""
    if argv and argv[0] == "sweep":
        from tune.sweep import main as sweep_main

        return sweep_main(argv[1:])
    if argv and argv[0] == "ui":
        from tune.ui import ui_main

        return ui_main(argv[1:])
    return None


def main(argv: list[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
