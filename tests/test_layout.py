"""The code's layout: each folder is one role, and imports only go down the role order

    HTTP face (server/) → engine (server/engine/) → speculation (server/speculation/)
    → draft network (draft_model/) | target (verifier/)

with training and evaluation (draft_model/training/) beside the HTTP face: it may use
speculation and below, and nothing at run time imports it. The draft network and the
target never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("server", "draft_model", "verifier")
MAX_RUNTIME_LINES = 400

# role → the roles its modules may import (its own included)
ALLOWED = {
    "http": {"http", "engine", "speculation", "draft", "target"},
    "training": {"training", "speculation", "draft", "target"},
    "engine": {"engine", "speculation", "draft", "target"},
    "speculation": {"speculation", "draft", "target"},
    "draft": {"draft"},
    "target": {"target"},
}


def role(module: str) -> str:
    for prefix, name in (("server.engine", "engine"), ("server.speculation", "speculation"),
                         ("server", "http"), ("draft_model.training", "training"),
                         ("draft_model", "draft"), ("verifier", "target")):
        if module == prefix or module.startswith(prefix + "."):
            return name
    raise ValueError(f"{module}: no role")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project's modules a file imports, anywhere in it (functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {module: imports(path, known) - {module} for module, path in known.items()}


def test_no_module_imports_from_a_role_above_its_own():
    climbs = [f"{module} ({role(module)}) imports {target} ({role(target)})"
              for module, targets in graph().items() for target in sorted(targets)
              if role(target) not in ALLOWED[role(module)]]
    assert not climbs, "\n".join(climbs)


def test_the_server_never_reaches_training():
    """From the command line and the app, no chain of imports reaches training's code."""
    edges = graph()
    reached, todo = set(), ["server.cli", "server.app", "server.builder"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(edges[module])
    assert "server.engine.loop" in reached and "verifier.target" in reached
    assert not [module for module in reached if role(module) == "training"]


def test_the_imports_have_no_cycle():
    edges = graph()
    # a package's __init__ may re-export what its own modules define
    for module in edges:
        edges[module] = {t for t in edges[module] if not module.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycle = [*stack[stack.index(target):], target]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_the_role_check_sees_a_climb(tmp_path):
    """The walk finds imports inside functions too, and names the climb."""
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from server.engine.loop import Engine\n")
    known = modules()
    assert imports(path, known) == {"server.engine.loop"}
    assert role("server.engine.loop") not in ALLOWED[role("server.speculation.budget")]


def test_no_runtime_module_is_over_400_lines():
    long = {module: n for module, path in modules().items()
            if role(module) != "training"
            and (n := len(path.read_text().splitlines())) > MAX_RUNTIME_LINES}
    assert not long, long
