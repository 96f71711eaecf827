"""``--help`` of every sub-command lists every field of its config with the field's default and help, because the
options are derived from the config dataclasses (:mod:`dilm.options`); ``dilm distill``'s preset yields only to the
options the user gives."""

import dataclasses
import re

import pytest

from dilm.cli import build_parser, main
from dilm.commands import OUTPUT, UNROLL_FLAGS, distill_config
from dilm.coreset import CoresetConfig
from dilm.distill import PRESETS, DistillConfig
from dilm.options import Flag, config_from_args, show
from dilm.protocol import EvalConfig
from dilm.softlabel import SoftLabelConfig
from dilm.tdd import TDDConfig
from dilm.unroll import UnrollConfig

# command → (its config, the spellings that are not --kebab-name, fields that are no option)
COMMANDS = {
    "evaluate": (EvalConfig, {"archs": "--arch"}, {"progress"}),
    "coreset": (CoresetConfig, {}, set()),
    "distill": (DistillConfig, {"output_dir": OUTPUT}, {"task"}),  # --task and the file options: add_task_args
    "softlabel": (SoftLabelConfig, UNROLL_FLAGS, {"progress"}),
    "tdd": (TDDConfig, UNROLL_FLAGS, {"progress"}),
}


def help_entries(argv: list[str], capsys, monkeypatch) -> dict[str, str]:
    """``dilm ARGV --help`` → {each option string: its entry, the invocation and its help on one line}."""
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: a help sits beside its invocation or on the line under it
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    entries: list[str] = []
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            entries.append(line.strip())
        elif line.startswith("    ") and entries:  # the help under a long invocation
            entries[-1] += "  " + line.strip()
    out = {}
    for entry in entries:
        for option in entry.split("  ")[0].split(", "):  # "-o OUTPUT, --output OUTPUT"
            out[option.split()[0]] = entry
    return out


def fields_and_options(cls, flags, skip, prefix=""):
    """(dotted field path, its option, the default text its help must show), nested configs included."""
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if path in skip:
            continue
        if dataclasses.is_dataclass(default):
            yield from fields_and_options(type(default), flags, skip, path + ".")
            continue
        spec = flags.get(path, f"--{f.name.replace('_', '-')}")
        if isinstance(spec, Flag):
            yield path, spec.names[-1], f"default: {f.name} {show(default)}"
        else:
            yield path, spec if isinstance(spec, str) else spec[-1], f"(default: {show(default)})"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_lists_every_config_field_with_its_default(command, capsys, monkeypatch):
    cls, flags, skip = COMMANDS[command]
    entries = help_entries([command], capsys, monkeypatch)
    seen = list(fields_and_options(cls, flags, skip))
    assert len(seen) >= len(dataclasses.fields(cls)) - len(skip)
    for path, option, default in seen:
        assert option in entries, f"dilm {command} --help lacks {option} ({path})"
        assert default in entries[option], f"{option}: {entries[option]!r} does not show {default!r}"
        help_text = entries[option].split(default)[0].split("  ")[-1]
        assert help_text.strip(" ("), f"{option} has no help"
    for option, entry in entries.items():  # the options that are no field have a help too
        assert len(entry.split("  ")) > 1, f"{option} has no help"


def test_defaults_shown_are_the_dataclass_defaults_by_value(capsys, monkeypatch):
    distill = help_entries(["distill"], capsys, monkeypatch)
    assert "(default: 50)" in distill["--outer-loops"] and "(default: 5,10,20)" in distill["--dpc"]
    assert "(default: 3e-06)" in distill["--generator-lr"] and "(default: off)" in distill["--all-layers"]
    assert "(default: runs/distill)" in distill["-o"] and "(default: gpu)" in distill["--preset"]
    assert "(default: 5)" in help_entries(["evaluate"], capsys, monkeypatch)["--seeds"]
    assert "(default: 2000)" in help_entries(["coreset"], capsys, monkeypatch)["--candidates-per-class"]
    softlabel = help_entries(["softlabel"], capsys, monkeypatch)
    assert "(default: 100)" in softlabel["--steps"] and "(default: 20)" in softlabel["--unroll"]
    assert "(default: none)" in softlabel["--inner-lr"] and "learn_lr on" in softlabel["--fixed-lr"]
    tdd = help_entries(["tdd"], capsys, monkeypatch)
    assert "(default: 32)" in tdd["--seq-len"] and "(default: 200)" in tdd["--eval-steps"]


@pytest.mark.parametrize("command", ["sweep", "ui"])
def test_orchestration_help_gives_every_option_a_help_and_a_default(command, capsys, monkeypatch):
    entries = help_entries([command], capsys, monkeypatch)
    assert "--storage" in entries
    for option, entry in entries.items():
        if option not in ("-h", "--help"):
            assert "default" in entry or "required" in entry, f"dilm {command} {option}: {entry!r}"


# files of the repository that a pip-installed package does not have (its own modules aside)
REPOSITORY_ONLY = re.compile(r"\b(?:bench|sweeps|docs|tests|cluster)/|\bmake [a-z]|\S+\.md\b")


@pytest.mark.parametrize("command", [*sorted(COMMANDS), "sweep", "ui"])
def test_help_sends_no_one_to_a_file_of_the_repository(command, capsys, monkeypatch):
    """A ``--help`` reaches users who installed the package alone: it names no ``bench/``, ``sweeps/``, ``docs/``
    file, no ``.md`` and no ``make`` target (the evidence behind a default belongs in a comment beside it)."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "--help" in text and not REPOSITORY_ONLY.findall(text), REPOSITORY_ONLY.findall(text)


def test_a_preset_yields_only_to_options_given():
    smoke = PRESETS["smoke"]
    assert smoke["outer_loops"] != DistillConfig.outer_loops and smoke["learner"] != DistillConfig.learner
    parse = build_parser().parse_args
    cfg = distill_config(parse(["distill", "--preset", "smoke", "-o", "x"]))
    assert {k: getattr(cfg, k) for k in smoke} == smoke  # no option left out overrode the preset
    assert cfg.output_dir == "x" and cfg.top_p == DistillConfig.top_p  # not in the preset: the dataclass default
    cfg = distill_config(parse(["distill", "--preset", "smoke", "--outer-loops", "4", "--learner", "minilm-l6",
                                "--set", "outer_loops=6", "--set", "n_sets=1", "--dpc", "3,1", "--all-layers"]))
    assert (cfg.outer_loops, cfg.learner, cfg.n_sets, cfg.dpc, cfg.all_layers) == (4, "minilm-l6", 1, (1, 3), True)
    assert cfg.inner_loop == smoke["inner_loop"] and cfg.generator == smoke["generator"]


def test_nested_and_renamed_options_build_the_config():
    args = build_parser().parse_args(["softlabel", "s.jsonl", "-o", "o.jsonl", "--unroll", "3", "--fixed-lr",
                                      "--inner-lr", "0.5", "--steps", "7", "--weights", "--learner", "tiny-bert"])
    cfg = config_from_args(SoftLabelConfig, args)
    assert cfg == SoftLabelConfig(steps=7, weights=True, unroll=UnrollConfig(learner="tiny-bert", steps=3, lr=0.5,
                                                                             learn_lr=False))
    bare = build_parser().parse_args(["tdd", "-o", "t", "--inner-lr", "none"])
    assert config_from_args(TDDConfig, bare) == TDDConfig()
