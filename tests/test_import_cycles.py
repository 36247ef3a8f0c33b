"""No import cycle between ember's packages: the folders are the architecture, and each may only lean on the
ones below it (formats and errors at the bottom, server and cli at the top).

Every import statement counts, those inside functions too (a lazy import is still a dependency), read with
`ast` from the source, so the check needs no import of ember itself. A node is a subpackage (ember/engine,
ember/store, ...) or a top-level module (ember/config.py, ...). `python -m tests.test_import_cycles` prints the
package graph and any cycle with the imports that make it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ember"


def _node(dotted: str) -> str | None:
    """ember.store.resolve -> "store"; ember.config -> "config"; anything outside ember -> None."""
    parts = dotted.split(".")
    if parts[0] != "ember" or len(parts) < 2:
        return None
    return parts[1]


def _imported(tree: ast.AST, module: str) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.append(target)
            if target == "ember":  # `from ember import llm` imports the module ember.llm; __version__ is no module
                names += [f"ember.{alias.name}" for alias in node.names
                          if (PACKAGE / alias.name).is_dir() or (PACKAGE / f"{alias.name}.py").is_file()]
    return names


def package_graph() -> dict[str, dict[str, list[str]]]:
    """{from node: {to node: ["module -> imported", ...]}} over every .py file of the package."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(rel[:-1] if rel[-1] == "__init__" else rel)
        source = _node(module) if len(rel) > 2 or rel[-1] != "__init__" else None
        if source is None:
            continue  # ember/__init__.py: the public face, allowed to import anything
        for name in _imported(ast.parse(path.read_text(), str(path)), module):
            target = _node(name)
            if target is not None and target != source:
                graph[source][target].append(f"{module} -> {name}")
    return graph


def cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, {}):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(graph, component: list[str]) -> str:
    lines = [" <-> ".join(component)]
    for source in component:
        for target in component:
            for edge in graph.get(source, {}).get(target, [])[:3]:
                lines.append(f"    {edge}")
    return "\n".join(lines)


def test_no_import_cycle_between_packages():
    graph = package_graph()
    assert {"engine", "layers", "loader", "store", "server", "formats"} <= set(graph) | {
        t for targets in graph.values() for t in targets}, "the walk found ember's packages"
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(describe(graph, c) for c in found)


def test_the_check_finds_a_cycle():
    graph = {"a": {"b": ["a.x -> b.y"]}, "b": {"c": ["b.y -> c.z"]}, "c": {"a": ["c.z -> a.x"]}, "d": {"a": []}}
    assert cycles(graph) == [["a", "b", "c"]]


if __name__ == "__main__":
    graph = package_graph()
    for source in sorted(graph):
        print(f"{source} -> {', '.join(sorted(graph[source]))}")
    for component in cycles(graph):
        print("CYCLE", describe(graph, component))
