"""Config fields with their help, and the command-line options derived from them: defaults live in one place.

A config is a frozen dataclass whose fields are declared with :func:`option` (default, one line of help, optional
choices). :func:`add_options` gives a parser one ``--kebab-name`` option per field, its help ending in the field's
default; a field whose type is itself a config (``unroll: UnrollConfig``) gets a group of its own, its options
written to dotted destinations (``unroll.steps``). :func:`given` reads back only the options the user gave, so that
the dataclass defaults (or a preset's values, for ``dilm distill``) fill in the rest.

Types: ``str``, ``int``, ``float``; ``X | None`` (``none`` on the command line); ``bool`` (``--flag`` /
``--no-flag``); ``tuple[int, ...]`` and ``tuple[str, ...]`` (comma-separated).

Every ``dilm`` parser is a :class:`Parser`: a mistyped command line gets one line naming what was wrong, not a screen
of usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import MISSING, dataclass, field

NONE = "none"  # an optional field's None on the command line


def option(default=MISSING, help: str = "", *, choices: Collection | None = None, default_factory=MISSING):
    """A config field with its help (and the values it may take, shown and checked on the command line)."""
    metadata = {"help": help} | ({"choices": tuple(choices)} if choices else {})
    return field(default=default, default_factory=default_factory, metadata=metadata)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr, then exit status 2::

        dilm coreset: error: argument --method: invalid choice: 'herdz' (choose from ...); see dilm coreset --help

    Its sub-command parsers are Parsers too (argparse makes them of their parent's class). An unknown option after a
    sub-command is that sub-command's error: plain argparse reports it from the top parser, whose ``--help`` does
    not list the option."""

    commands: argparse.Action | None = None  # the sub-command action, once add_subparsers is called

    def add_subparsers(self, **kwargs):
        self.commands = super().add_subparsers(**kwargs)
        return self.commands

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            chosen = self.commands and self.commands.choices.get(getattr(parsed, self.commands.dest, None))
            (chosen or self).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def error(self, message: str):
        message = " ".join(line.strip() for line in message.splitlines())
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


@dataclass(frozen=True)
class Flag:
    """A field's command-line spelling where it is not ``--kebab-name``: other ``names`` (``("-o", "--output")``),
    or, with ``negate``, one flag that sets a boolean field to False (``--fixed-lr`` for ``learn_lr``)."""

    names: tuple[str, ...]
    negate: bool = False
    help: str | None = None


def ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def strs(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def show(value) -> str:
    """A default as it is typed on the command line."""
    if value is None:
        return NONE
    if value == "":
        return "''"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _or_none(tp: type) -> Callable[[str], object]:
    def parse(s: str):
        return None if s.lower() == NONE else tp(s)

    parse.__name__ = f"{tp.__name__} or {NONE}"  # argparse's "invalid ... value" message names it
    return parse


def _parser_of(tp) -> Callable[[str], object]:
    """The argparse ``type`` of a field's (resolved) annotation."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) and len(args) == 2 and type(None) in args:
        return _or_none(next(a for a in args if a is not type(None)))
    if typing.get_origin(tp) is tuple and args[1:] == (Ellipsis,) and args[0] in (int, str):
        return ints if args[0] is int else strs
    if tp in (int, float, str):
        return tp
    raise TypeError(f"no command-line form for fields of type {tp!r}")


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is MISSING else f.default


Spelling = str | tuple[str, ...] | Flag


def add_options(parser: argparse.ArgumentParser, cls, *, flags: Mapping[str, Spelling] | None = None,
                skip: Collection[str] = (), only: Collection[str] | None = None, prefix: str = "",
                title: str | None = None) -> argparse._ArgumentGroup:
    """One option per field of ``cls``, in a group ``title`` (default: the class name); ``flags`` and ``skip`` by
    dotted path (``"unroll.steps"``); ``only``: these fields and no others; ``prefix``: of the destinations.

    Every option's argparse default is ``SUPPRESS``: an option not given is absent from the parsed namespace (see
    :func:`given`); the help shows the field's default instead. Returns the group, for options that are no field."""
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        if path in skip or (only is not None and f.name not in only):
            continue
        tp, default = hints[f.name], _default(f)
        if dataclasses.is_dataclass(tp):
            add_options(parser, tp, flags=flags, skip=skip, prefix=path + ".",
                        title=f"{f.metadata.get('help') or f.name} ({tp.__name__})")
            continue
        spec = (flags or {}).get(path, ())
        spec = spec if isinstance(spec, Flag) else Flag((spec,) if isinstance(spec, str) else tuple(spec))
        names = spec.names or (f"--{f.name.replace('_', '-')}",)
        text = spec.help or f.metadata.get("help", "")
        kw: dict = {"dest": path, "default": argparse.SUPPRESS, "help": f"{text} (default: {show(default)})"}
        if spec.negate:
            kw.update(action="store_false" if default else "store_true",
                      help=f"{text} (sets {f.name} {show(not default)}; default: {f.name} {show(default)})")
        elif tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _parser_of(tp)
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            else:
                kw["metavar"] = names[-1].lstrip("-").replace("-", "_").upper()
        kw["help"] = kw["help"].replace("%", "%%")  # argparse formats help with %
        group.add_argument(*names, **kw)
    return group


def given(cls, args: argparse.Namespace, prefix: str = "") -> dict:
    """The fields of ``cls`` given on the command line → ``{name: value}``; a nested config given in part is built
    whole (its other fields at their defaults)."""
    values, hints = vars(args), typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            if sub := given(hints[f.name], args, path + "."):
                out[f.name] = hints[f.name](**sub)
        elif path in values:
            out[f.name] = values[path]
    return out


def config_from_args(cls, args: argparse.Namespace, prefix: str = "", **fixed):
    """``cls`` from the options given (the rest at the dataclass defaults) and ``fixed``, which are not options."""
    return cls(**{**given(cls, args, prefix), **fixed})
