import subprocess
import sys


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
