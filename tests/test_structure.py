"""The shape of the house: no import cycles in ``dilm`` and ``tune``, ``dilm`` never imports Ray, and no module grows
past ~400 lines without its docstring saying why ("Long because ...").

Imports are read from the sources (``ast``), not executed: every ``import`` / ``from ... import`` anywhere in a module
counts (also inside functions), except those under ``if TYPE_CHECKING:``, which never run.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dilm", "tune")
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            out[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return out


def _runtime_nodes(tree: ast.AST):
    """All nodes, skipping the bodies of ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imported_names(path: Path) -> set[str]:
    """Absolute module names a source file imports (``from pkg import mod`` names ``pkg.mod`` when that exists)."""
    names = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
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


def test_the_walk_sees_the_imports():
    edges = graph()
    assert {"dilm.cli", "dilm.commands", "dilm.distill", "tune.sweep", "tune.pool"} <= set(edges)
    assert "dilm.matching" in edges["dilm.distill"] and "dilm.commands" in edges["dilm.cli"]
    assert "dilm.evaluate" not in edges["dilm.ensemble"]  # a TYPE_CHECKING import is not an arrow
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_dilm_never_imports_ray():
    offenders = {m: sorted(n for n in imported_names(p) if n.split(".")[0] in ("ray", "optuna"))
                 for m, p in modules().items() if m.startswith("dilm")}
    assert not {m: n for m, n in offenders.items() if n}


@pytest.mark.parametrize("module", sorted(modules()))
def test_long_modules_say_why(module):
    path = modules()[module]
    lines = len(path.read_text().splitlines())
    if lines > MAX_LINES:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        where = path.relative_to(ROOT)
        assert "Long because" in doc, f"{where} has {lines} lines and no 'Long because' in its docstring"
