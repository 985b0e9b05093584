"""The import structure: no cycle between selfkd's parts, and light imports stay light.

Every ``import`` statement of every module counts, also those inside functions and under
``TYPE_CHECKING``: a lazy import hides a cycle at run time but not from a reader. A part is a
subpackage (``selfkd.data``, ``selfkd.methods``, ...) or a top-level module (``selfkd.config``,
``selfkd.banks``, ...); the package's own ``__init__`` (re-exports) is left out.
"""

from __future__ import annotations

import ast
import itertools
import json
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "selfkd"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def part_of(module: str) -> str | None:
    """``selfkd.data.mixing`` -> ``selfkd.data``; ``selfkd.config`` -> itself; None for the
    root package and for names outside selfkd."""
    parts = module.split(".")
    if parts[0] != "selfkd" or len(parts) < 2:
        return None
    return ".".join(parts[:2])


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (functions and TYPE_CHECKING too)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            out.add(source)
            for alias in node.names:  # ``from selfkd import metrics`` imports a module
                candidate = f"{source}.{alias.name}"
                if (SRC / candidate.replace(".", "/")).with_suffix(".py").exists() or (
                    SRC / candidate.replace(".", "/") / "__init__.py"
                ).exists():
                    out.add(candidate)
    return out


def part_graph() -> dict[str, dict[str, list[str]]]:
    """part -> {imported part: [the modules that import it]}."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(PKG.rglob("*.py")):
        source = part_of(module_name(path))
        if source is None:
            continue
        graph.setdefault(source, {})
        for target in map(part_of, imported_modules(path)):
            if target is not None and target != source:
                graph[source].setdefault(target, []).append(module_name(path))
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b": ["a.x"]}, "b": {"c": ["b.y"]}, "c": {"a": ["c.z"]}, "d": {"a": ["d"]}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": []}, "b": {}}) is None


def test_function_level_imports_are_counted() -> None:
    assert "selfkd.data.samplers" in imported_modules(PKG / "methods" / "cskd.py")
    assert part_of("selfkd.data.samplers") == "selfkd.data"
    assert part_of("selfkd.config") == "selfkd.config" and part_of("selfkd") is None


def test_no_import_cycle_between_parts() -> None:
    graph = part_graph()
    assert {"selfkd.config", "selfkd.data", "selfkd.methods", "selfkd.engine"} <= set(graph)
    cycle = find_cycle(graph)
    if cycle is not None:
        ties = [f"{a} -> {b} (in {', '.join(graph[a][b])})" for a, b in itertools.pairwise(cycle)]
        raise AssertionError("import cycle: " + "; ".join(ties))


def loaded_after(statement: str) -> list[str]:
    code = (
        f"import json, sys\n{statement}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('selfkd'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=SRC
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_losses_and_method_base_load_no_dataset_reader() -> None:
    losses = loaded_after("import selfkd.losses")
    assert not [m for m in losses if m.startswith(("selfkd.data", "selfkd.config"))], losses
    base = loaded_after("import selfkd.methods.base")
    assert "selfkd.methods.base" in base
    assert not [m for m in base if m.startswith("selfkd.data")], base
