"""The house's rules about itself: imports flow one way (shards <- pretrain <- downstream), no two modules import
each other (directly or round a loop, function-level imports included), and the recipe's objective sections are
exactly the registered objectives."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from pretrain.objectives import known_objectives
from pretrain.recipe import ObjectiveConfig

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("shards", "pretrain", "downstream")
MAY_IMPORT = {"shards": {"shards"}, "pretrain": {"shards", "pretrain"}, "downstream": set(ROOMS)}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its code."""
    modules = {}
    for room in ROOMS:
        for path in (ROOT / room).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_flow_one_way_and_never_in_a_loop():
    graph = import_graph()
    assert {"shards.tar", "pretrain.trainer", "downstream.probe"} <= set(graph)  # the walk found the rooms
    wrong = sorted((m, d) for m, deps in graph.items() for d in deps if d.split(".")[0] not in MAY_IMPORT[m.split(".")[0]])
    assert wrong == []
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_recipe_sections_are_the_registered_objectives():
    sections = {f.name for f in dataclasses.fields(ObjectiveConfig)} - {"name"}
    assert sections == set(known_objectives())


# Imported inside a function on purpose: optional (pyarrow), or slow to import and needed on one path only
# (matplotlib ~1 s, open_clip ~2 s, scikit-learn's datasets, zero-shot which pulls open_clip); and the command-line
# entry points, which import only the verb asked for.
LAZY = ("matplotlib", "open_clip", "pyarrow", "sklearn", "downstream.zeroshot")
ENTRY_POINTS = {"pretrain/__main__.py", "downstream/__main__.py", "downstream/demo.py"}


def test_function_level_imports_are_only_the_deliberately_lazy_ones():
    found = []
    for room in ROOMS:
        for path in sorted((ROOT / room).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in ENTRY_POINTS:
                continue
            for fn in ast.walk(ast.parse(path.read_text())):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(fn):
                    if isinstance(node, ast.Import):
                        names = [a.name for a in node.names]
                    elif isinstance(node, ast.ImportFrom):
                        names = [node.module or ""]
                    else:
                        continue
                    found += [f"{rel}:{node.lineno} {n}" for n in names if not n.startswith(LAZY)]
    assert found == [], "import these at the top of the module (or add the reason to LAZY)"
