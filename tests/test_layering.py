"""No import cycle between atman_kernels modules; atman_kernels.hf keeps its declared layering.

The imports are read from the source with ast (nothing is imported), all of them: top-level,
inside functions (lazy imports) and under ``if TYPE_CHECKING:`` — a cycle through a lazy or a
typing-time import is still two modules that each need the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "atman_kernels"

# atman_kernels.hf's modules, lowest first: each may import only those before it
# (the order the package docstring states)
HF_LAYERS = ("_tags", "masks", "factors", "guards", "routing", "layers", "attention", "switch")


def _modules(package: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package __init__) of every module under ``package``."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports.

    ``from X import name`` imports ``X.name`` when that is a module, else ``X`` itself; a
    relative import is resolved against the importing module's package.
    """
    modules = _modules(package)
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = {f"{target}.{a.name}" for a in node.names} & set(modules)
                out |= subs
                if len(subs) < len(node.names) and target in modules:
                    out.add(target)
        out.discard(name)
        graph[name] = out
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle [a, b, ..., a], or None (depth-first search, colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_in_atman_kernels():
    graph = import_graph(PACKAGE)
    assert "atman_kernels.hf.attention" in graph and len(graph) > 30  # the whole package read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_hf_modules_import_only_lower_layers():
    graph = import_graph(PACKAGE)
    names = {f"atman_kernels.hf.{m}" for m in HF_LAYERS}
    on_disk = {m for m in graph if m.startswith("atman_kernels.hf.")}
    assert on_disk == names, f"hf modules {sorted(on_disk ^ names)} missing from HF_LAYERS"
    for level, module in enumerate(HF_LAYERS):
        allowed = {f"atman_kernels.hf.{m}" for m in HF_LAYERS[:level]}
        imported = graph[f"atman_kernels.hf.{module}"]
        inside = {m for m in imported if m.startswith("atman_kernels.hf")}
        assert inside <= allowed, (
            f"atman_kernels.hf.{module} imports {sorted(inside - allowed)}, which are not below "
            f"it in the layering {HF_LAYERS}")


def test_the_check_finds_cycles_through_lazy_and_typing_imports(tmp_path):
    """The check can fail: a planted cycle through a function-level import on one side and a
    TYPE_CHECKING import on the other is found, as is a package __init__ imported back."""
    pkg = tmp_path / "demo"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .sub import b\n")
    (pkg / "a.py").write_text("def f():\n    from .sub.b import g\n    return g\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import f\n")
    graph = import_graph(pkg)
    assert graph["demo.a"] == {"demo.sub.b"} and graph["demo.sub.b"] == {"demo.a"}
    assert graph["demo"] == {"demo.sub.b"}
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"demo.a", "demo.sub.b"}

    (pkg / "sub" / "b.py").write_text("def g():\n    pass\n")  # the cycle broken
    assert find_cycle(import_graph(pkg)) is None

    (pkg / "sub" / "b.py").write_text("from .. import a\n")  # "from package import module"
    assert set(find_cycle(import_graph(pkg))) == {"demo.a", "demo.sub.b"}

    (pkg / "sub" / "b.py").write_text("import demo\n")  # the package's __init__ imported back
    assert set(find_cycle(import_graph(pkg))) == {"demo", "demo.sub.b"}
