import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import dilm

ROOT = Path(__file__).resolve().parents[1]


def test_method_package_never_imports_ray_optuna_or_mlflow():
    code = ("import pkgutil, importlib, sys, dilm\n"
            "for m in pkgutil.iter_modules(dilm.__path__): importlib.import_module('dilm.' + m.name)\n"
            "import dilm.cli; dilm.cli.build_parser()\n"
            "print(sorted(k for k in ('ray', 'optuna', 'mlflow') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_dilm_help_lists_every_command():
    code = "from dilm.cli import main; main(['--help'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    for cmd in ("evaluate", "coreset", "distill", "softlabel", "tdd", "sweep", "ui"):
        assert cmd in out.stdout


def test_git_revision_from_checkout_env_or_unknown(tmp_path, monkeypatch):
    """Provenance's git_revision: ``git rev-parse HEAD`` in a checkout; ``$DILM_GIT_REVISION`` first (what a Ray job
    submitted with --working-dir is given: its copy has no .git); "unknown" in a copy without either."""
    monkeypatch.delenv(dilm.GIT_REVISION_ENV, raising=False)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert dilm.git_revision() == head.stdout.strip()
    monkeypatch.setenv(dilm.GIT_REVISION_ENV, "0123abc")
    assert dilm.git_revision() == "0123abc"

    copy = tmp_path / "copy"  # like Ray's working-dir copy: the package without .git (nor a checkout above it)
    shutil.copytree(ROOT / "dilm", copy / "dilm", ignore=shutil.ignore_patterns("__pycache__", "data"))
    code = "import dilm; print(dilm.__file__, dilm.git_revision())"
    for env, expected in (({}, "unknown"), ({dilm.GIT_REVISION_ENV: "0123abc"}, "0123abc")):
        clean = {k: v for k, v in os.environ.items() if k not in (dilm.GIT_REVISION_ENV, "PYTHONPATH")}
        out = subprocess.run([sys.executable, "-c", code], cwd=copy, env={**clean, **env}, capture_output=True,
                             text=True, check=True).stdout.split()
        assert out == [str(copy / "dilm" / "__init__.py"), expected]


def test_the_wheel_ships_the_presets_and_the_distill_package(tmp_path):
    """pyproject's package data includes ``dilm/presets/*.yaml`` (PRESETS is read from them) and the package search
    finds ``dilm.distill``: a wheel built from a copy of the sources holds every preset file and every module."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("dilm", "tune"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], capture_output=True, text=True, check=True)
    names = set(zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl"))).namelist())
    presets = {f"dilm/presets/{p.name}" for p in (ROOT / "dilm" / "presets").glob("*.yaml")}
    modules = {f"dilm/distill/{p.name}" for p in (ROOT / "dilm" / "distill").glob("*.py")}
    assert len(presets) >= 4 and presets <= names
    assert "dilm/distill/__init__.py" in modules and modules <= names
