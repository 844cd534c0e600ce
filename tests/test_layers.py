"""Imports point one way: a layer never imports a layer above it, and no modules import each other
in a cycle (docs/ARCHITECTURE.md). Every import counts, also those inside functions."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["cc_core", "tasks", "flows", "deploy", "benchmarks", "cleancompact"]  # bottom to top


def _module(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports} over every package in LAYERS."""
    modules = {_module(p): p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            else:
                continue
            targets |= {f for f in found if f in modules and f != name}
        graph[name] = targets
    return graph


def test_no_layer_imports_a_layer_above_it():
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = [(a, b) for a, targets in import_graph().items() for b in targets
              if rank[b.split(".")[0]] > rank[a.split(".")[0]]]
    assert not upward, f"upward imports: {upward}"


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 on the path, 2 done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "deploy.local" in graph["cleancompact.pipeline_cli"]  # imported inside cmd_up
