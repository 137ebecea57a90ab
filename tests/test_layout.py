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


# The only packages an engine module may import inside a function, and why: each takes from
# 0.2 s to several seconds to load, and the commands that never need it (`nsd --help`, the
# inspection commands, balance) should not pay for it.
LAZY = {
    "torch": "about 2 s; only commands that run a model need it",
    "torchvision": "loads torch",
    "timm": "loads torch and its model registry",
    "safetensors": "safetensors.torch loads torch",
    "datasets": "Hugging Face sources and exports only; about 1 s",
    "huggingface_hub": "the hub, only for pretrained weights",
    "imagehash": "loads scipy; hashing only",
    "scipy": "0.4-0.7 s; the temperature fit and near-duplicate groups only",
    "fsspec": "0.2 s; only file and object-store paths need it",
    "pyarrow": "0.3 s for pyarrow.parquet; only writers and readers of Parquet parts",
}


def test_function_level_imports_are_only_heavy_packages():
    """No import hidden in a function to dodge a cycle: engine modules, the standard library and
    light packages are imported at the top."""
    hidden = []
    for path in sorted(ENGINE.glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    modules = [node.module or ""]
                elif isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                else:
                    continue
                hidden += [(path.stem, fn.name, m) for m in modules if m.split(".")[0] not in LAZY]
    assert hidden == []
