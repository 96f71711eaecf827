"""constraints.txt locks the versions the suite last passed with (``make install`` installs with it, ``make lock``
rewrites it); pyproject.toml keeps the ranges a library user resolves. The lock must cover every dependency within
its range, and leave torch to ``TORCH_SPEC``."""

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    """constraints.txt → {canonical name: the version pinned with ==}."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==" and not req.marker, f"not a plain pin: {line!r}"
            assert canonicalize_name(req.name) not in out, f"pinned twice: {req.name}"
            out[canonicalize_name(req.name)] = spec.version
    return out


def declared() -> list[Requirement]:
    """pyproject.toml's dependencies and dev extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]


def test_every_dependency_is_pinned_within_its_range_and_torch_is_left_to_torch_spec():
    locked = pins()
    for req in declared():
        name = canonicalize_name(req.name)
        if name == "torch":  # the Makefile's TORCH_SPEC decides: the CPU wheel here, the user's own build on a GPU
            assert name not in locked
            continue
        assert name in locked, f"{req.name} is not in constraints.txt: run make lock"
        assert req.specifier.contains(locked[name], prereleases=True), f"{req.name}=={locked[name]} outside {req}"
    assert "dilm" not in locked


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_install_passes_the_constraints():
    # the Makefile's own default: no variable of a calling make or of the environment overrides it
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "CONSTRAINTS", "VENV")}
    recipe = subprocess.run(["make", "-n", "-B", "install"], cwd=ROOT, env=env, capture_output=True, text=True,
                            check=True)
    (line,) = [x for x in recipe.stdout.splitlines() if "-e '.[dev]'" in x]
    assert " -c constraints.txt " in line
