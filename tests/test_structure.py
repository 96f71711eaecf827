"""The shape of the house: no import cycles in ``dilm`` and ``tune`` (sub-packages included), ``dilm`` never imports
Ray and only its CLI imports ``tune``, no module longer than 400 lines, no bench re-defining a package's name nor
computing its own intervals or commit, and the design notes' module list naming every module.

Imports are read from the sources (``ast``), not executed: every ``import`` / ``from ... import`` anywhere in a module
counts — inside functions too, and under ``if TYPE_CHECKING:``: a circle that only type hints close is still one
(the modules are one piece that cannot be read or split apart).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dilm", "tune")
MAX_LINES = 400


def module_name(path: Path) -> str:
    """``dilm/archs/icl.py`` → ``dilm.archs.icl``; a package's ``__init__.py`` → the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py"))}


def imported_names(path: Path) -> set[str]:
    """Absolute module names a source file imports (``from pkg import mod`` names ``pkg.mod`` when that exists)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {n for n in imported_names(p) if n in mods and n != m} for m, p in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m, path):
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n, path + [n])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m, [m])):
            return cycle
    return None


def test_the_walk_sees_the_imports(tmp_path):
    edges = graph()
    assert {"dilm.cli", "dilm.commands", "dilm.distill", "tune.sweep", "tune.pool"} <= set(edges)
    assert {"dilm", "dilm.archs", "dilm.archs.icl"} <= set(edges)  # packages and their modules
    assert "dilm.matching" in edges["dilm.distill.match_stage"] and "dilm.commands" in edges["dilm.cli"]
    assert "dilm.distill.run" in edges["dilm.distill"] and "dilm.distill.config" in edges["dilm.distill.checkpoint"]
    assert "dilm.archs.icl" in edges["dilm.archs"] and "dilm.archs.base" in edges["dilm.archs.icl"]
    assert "dilm.evaluate" not in edges["dilm.ensemble"]  # the protocol is its own module: no circle through it
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from dilm.evaluate import Scores\n\n\n"
                   "def f():\n    import dilm.tdd\n")
    assert {"dilm.evaluate", "dilm.evaluate.Scores", "dilm.tdd"} <= imported_names(src)  # type-only and local
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_dilm_never_imports_ray():
    offenders = {m: sorted(n for n in imported_names(p) if n.split(".")[0] in ("ray", "optuna"))
                 for m, p in modules().items() if m.startswith("dilm")}
    assert not {m: n for m, n in offenders.items() if n}


BEING_SPLIT: dict[str, str] = {}  # modules over the limit for now, and why


@pytest.mark.parametrize("module", [pytest.param(m, marks=pytest.mark.xfail(reason=BEING_SPLIT[m], strict=False))
                                    if m in BEING_SPLIT else m for m in sorted(modules())])
def test_no_module_is_longer_than_the_limit(module):
    path = modules()[module]
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES}): split it"


def test_only_the_cli_imports_tune():
    """``dilm`` is the method; ``tune`` orchestrates it. Only the CLI (``dilm sweep`` …) reaches up into ``tune``."""
    offenders = {m: sorted(n for n in imported_names(p) if n.split(".")[0] == "tune")
                 for m, p in modules().items() if m.startswith("dilm") and m != "dilm.cli"}
    assert not {m: n for m, n in offenders.items() if n}


def top_level_names(path: Path) -> set[str]:
    """The functions, classes and assigned names a module defines at its top level (not those it imports)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_no_bench_script_redefines_what_the_packages_define():
    """A bench calls the product: a function or class of its own named like one of ``dilm`` / ``tune`` is a second
    implementation in the making (a copied ``paired_interval``, ``git_revision``, ``halves``...)."""
    exported = {n for p in modules().values() for n in top_level_names(p) if not n.startswith("_")}
    exported -= {"main", "ROOT"}  # every script has a main, many modules a ROOT: names, not implementations
    scripts = sorted((ROOT / "bench").glob("*.py"))
    assert len(scripts) >= 5  # the scan sees the benches
    clashes = {s.name: sorted(top_level_names(s) & exported) for s in scripts}
    assert not {s: n for s, n in clashes.items() if n}, clashes


def test_benches_take_intervals_and_the_commit_from_the_product():
    """Under other names, too: a bench's intervals come from ``dilm.stats`` (no Student-t quantile of its own, no
    scipy) and its commit from ``dilm.git_revision`` through ``bench/record.py`` (no ``git rev-parse`` of its own).
    #34 found interval helpers defined six times in five files, with three return shapes."""
    scripts = sorted((ROOT / "bench").glob("*.py"))
    offenders = {}
    for s in scripts:
        src = s.read_text()
        found = sorted(n for n in imported_names(s) if n.split(".")[0] == "scipy")
        found += [w for w in (".ppf(", "rev-parse") if w in src]
        if found:
            offenders[s.name] = found
    assert not offenders, offenders


def test_the_design_notes_name_every_module():
    """docs/design.md's list of modules by job (README's Development table links to it) names each module of
    ``dilm`` and ``tune`` (in backticks, in its package's line): a module added without a word there is drift a
    reader trips on."""
    rows = {line.split(" — ")[0].strip("- `/"): line for line in (ROOT / "docs" / "design.md").read_text().splitlines()
            if line.startswith(("- `dilm/` — ", "- `tune/` — "))}
    assert set(rows) == set(PACKAGES)
    missing = []
    for m in modules():
        parts = m.split(".")
        if len(parts) == 1:
            continue
        package = (ROOT / Path(*parts) / "__init__.py").exists()  # a sub-package: its folder is named
        if f"`{parts[-1]}{'/' if package else ''}`" not in rows[parts[0]]:
            missing.append(m)
    assert not missing, f"docs/design.md's modules by job do not name {missing}"
