"""The modules of seer import each other without a loop, counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import seer

ROOT = Path(seer.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(tree: ast.AST):
    """Every import statement in ``tree``, inside functions too, but not under ``if TYPE_CHECKING:`` (never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from imports(node)


def import_graph() -> dict[str, set[str]]:
    """Each module of seer and the seer modules it imports anywhere in its file (``from seer.a import b`` counts as
    an import of ``seer.a.b`` when that is a module, else of ``seer.a``; relative imports are resolved)."""
    files = {module_name(path): path for path in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.add(submodule if submodule in files else base)
        graph[name] = {target for target in targets if target in files and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of modules that import each other in a circle, or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the search path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_graph_sees_function_level_and_relative_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    graph = import_graph()
    assert "seer.kernels.common" in graph["seer.kernels.block_sparse"]
    assert "seer.model.inference" in graph["seer"]  # imported inside ``seer.load``


def test_no_import_cycle_in_seer():
    assert find_cycle(import_graph()) is None


def test_kernels_and_checks_are_leaves():
    """``seer.kernels`` imports nothing from the rest of seer, ``seer.checks`` nothing from seer at all."""
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith("seer.kernels"):
            assert all(t.startswith("seer.kernels") for t in targets), (module, targets)
    assert graph["seer.checks"] == set()
