"""A mistyped ``dilm`` command line gets one line on stderr naming what was wrong (and, for a choice, the values
allowed), then exit status 2: no screen of usage. Argument errors come before any work, so these start no Ray and
load no model."""

import pytest

from dilm.cli import main
from dilm.coreset import METHODS
from dilm.distill import PRESETS
from dilm.tdd import INITS
from dilm.unroll import MODES

# command → the arguments it needs, which the cases below add to
VALID = {
    "evaluate": ["set.jsonl", "--task", "sst2"],
    "coreset": ["--task", "sst2", "-o", "out"],
    "distill": ["--preset", "smoke"],
    "softlabel": ["set.jsonl", "--task", "sst2", "-o", "out.jsonl"],
    "tdd": ["--task", "sst2", "-o", "out"],
    "sweep": ["--config", "sweeps/demo.yaml"],
    "ui": ["--storage", "runs/sweeps"],
}
# command → (argv with a bad choice, the bad value, the values allowed)
BAD_CHOICE = {
    "coreset": (["--method", "herdz"], "herdz", METHODS),
    "distill": (["--preset", "fast"], "fast", PRESETS),
    "softlabel": (["--mode", "half"], "half", MODES),
    "tdd": (["--init", "zeros"], "zeros", INITS),
}
# command → (argv missing a required option or argument, what is missing)
MISSING = {
    "evaluate": (["--task", "sst2"], "sets"),
    "coreset": (["--task", "sst2"], "--output"),
    "softlabel": (["set.jsonl", "--task", "sst2"], "--output"),
    "sweep": (["--smoke"], "--config"),
}
# command → (argv with a value of the wrong type, the bad value)
BAD_TYPE = {"evaluate": (["--seeds", "five"], "five"), "ui": (["--port", "http"], "http")}


def one_line_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    prog = lines[0].split(": error: ")[0]
    assert lines[0].endswith(f"; see {prog} --help"), lines[0]
    return lines[0]


@pytest.mark.parametrize("command", sorted(BAD_CHOICE))
def test_a_bad_choice_names_the_value_and_the_choices(command, capsys):
    argv, bad, allowed = BAD_CHOICE[command]
    err = one_line_error([command, *VALID[command], *argv], capsys)
    assert err.startswith(f"dilm {command}: error: argument {argv[0]}: invalid choice: '{bad}' (choose from ")
    listed = err.split("(choose from ")[1]
    assert all(value in listed for value in allowed), err


@pytest.mark.parametrize("command", sorted(VALID))
def test_an_unknown_option_is_the_sub_commands_one_line_error(command, capsys):
    err = one_line_error([command, *VALID[command], "--no-such-option"], capsys)
    assert err.startswith(f"dilm {command}: error: unrecognized arguments: --no-such-option")


@pytest.mark.parametrize("command", sorted(MISSING))
def test_a_missing_required_argument_is_named(command, capsys):
    argv, missing = MISSING[command]
    err = one_line_error([command, *argv], capsys)
    assert err.startswith(f"dilm {command}: error: the following arguments are required: ") and missing in err


@pytest.mark.parametrize("command", sorted(BAD_TYPE))
def test_a_value_of_the_wrong_type_is_named(command, capsys):
    argv, bad = BAD_TYPE[command]
    err = one_line_error([command, *VALID[command], *argv], capsys)
    assert f"argument {argv[0]}: invalid" in err and f"'{bad}'" in err


def test_a_bad_or_missing_command_is_one_line(capsys):
    err = one_line_error(["frobnicate"], capsys)
    assert err.startswith("dilm: error: argument command: invalid choice: 'frobnicate' (choose from ")
    assert all(command in err.split("(choose from ")[1] for command in VALID)
    assert one_line_error([], capsys) == ("dilm: error: the following arguments are required: command; "
                                          "see dilm --help")


# command → (argv naming a model that does not resolve, the config key the error names, the name)
BAD_MODEL = {
    "distill": (["--generator", "nonexistent-gen-xyz"], "generator", "nonexistent-gen-xyz"),
    "distill --evaluate": (["--evaluate", "--arch", "minilm-probe,icl-nonexistent"], "--arch", "icl-nonexistent"),
    "evaluate": (["--arch", "minilm-probe,nonexistent-model-xyz"], "--arch", "nonexistent-model-xyz"),
    "softlabel": (["--learner", "nonexistent-learner"], "learner", "nonexistent-learner"),
    "tdd": (["--learner", "./no/such/learner"], "learner", "./no/such/learner"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODEL))
def test_a_model_that_does_not_resolve_is_one_line_before_any_data(case, capsys, monkeypatch):
    """Resolved as the run would resolve it, when the config is built: no data read, nothing trained, no hub
    retries (HF_HUB_OFFLINE: the local cache only)."""
    import dilm.commands

    def never(*args, **kwargs):
        raise AssertionError("data loaded or a run started although a model does not resolve")

    for name in ("load_task", "task_from_args", "distill", "distill_tdd", "Evaluator", "SoftLabeler"):
        monkeypatch.setattr(dilm.commands, name, never)
    command = case.split()[0]
    argv, key, name = BAD_MODEL[case]
    assert main([command, *VALID[command], *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured.err
    assert captured.err.startswith(f"dilm: error: {key}: ") and name in captured.err
    assert "known model" in captured.err or "known models" in captured.err
