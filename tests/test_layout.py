"""The module layout the loading pipeline relies on: no import cycles, `io/` readers as leaves,
`nn/` layers free of backends. Read from the source (every import, lazy ones inside functions
included), so a cycle that only happens to work at run time still fails here."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / "ember").rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in ast.walk(node):
                if hasattr(sub, "lineno"):
                    lines.add(sub.lineno)
    return lines


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                for a in node.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{origin}.{a.name}"
                    targets.append(sub if sub in mods else origin)
            graph[mod].update(t for t in targets if t in mods and t != mod)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_among_ember_modules():
    assert _cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_io_readers_are_leaves():
    """io/ modules import nothing of ember but its errors (and each other)."""
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("ember.io"):
            bad = {d for d in deps if not (d == "ember.errors" or d.startswith("ember.io"))}
            assert not bad, f"{mod} imports {bad}"


def test_layers_import_no_backend_and_no_pipeline():
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("ember.nn"):
            bad = {d for d in deps if d.startswith(("ember.backends", "ember.kernels", "ember.loading", "ember.transforms", "ember.api",
                                                    "ember.engine", "ember.models"))}
            assert not bad, f"{mod} imports {bad}"


def test_models_do_not_import_the_pipeline_or_the_api():
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("ember.models"):
            bad = {d for d in deps if d.startswith(("ember.loading", "ember.api", "ember.engine", "ember.serve",
                                                    "ember.backends", "ember.transforms", "ember.registry"))}
            assert not bad, f"{mod} imports {bad}"
