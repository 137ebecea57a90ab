"""The engine's layout, checked on its source (issue 23): what a newcomer may rely on."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "engine"


def _imports():
    """(module, imported engine module, names, at module level?) for every nsd.engine import."""
    out = []
    for path in sorted(ENGINE.glob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nsd.engine"):
                names = [a.name for a in node.names]
                targets = [node.module.rsplit(".", 1)[1]] if node.module != "nsd.engine" else names
                for target in targets:
                    out.append((path.stem, target, names, id(node) in top))
    return out


def test_no_module_imports_another_modules_private_names():
    private = [(m, t, n) for m, t, names, _ in _imports() for n in names
               if n.startswith("_") and not n.startswith("__") and t != m]
    assert private == []


def test_the_module_level_imports_between_engine_modules_have_no_cycle():
    graph: dict[str, set[str]] = {}
    for module, target, _, top in _imports():
        if top and (ENGINE / f"{target}.py").exists():
            graph.setdefault(module, set()).add(target)

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert [m for m in graph if m in reach(m)] == []
    assert len(graph) >= 20  # the scan sees the engine's modules
