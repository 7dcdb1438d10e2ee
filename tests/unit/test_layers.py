"""The layer order, read from the source: every import of every module of the three packages.

    thaw_agents (LangChain face)  ->  thaw_agents_core  ->  thaw_kernels (triton_kernels/)

- the kernels import no vLLM and nothing of ours;
- the core imports no LangChain (nor the face);
- inside the core, each subpackage imports only itself and the subpackages below it (``LAYERS``);
  the top-level modules (``TOP_LEVEL``) are above every subpackage, which never imports them;
- no import cycle between any two modules.

Imports are read with ``ast`` from every .py file: function-level and ``TYPE_CHECKING`` imports
count like top-level ones. ``thaw_agents_core/__init__.py`` resolves its names lazily
(``import_module`` of names it computes), which no AST sees; since no subpackage imports it, it
cannot be part of a cycle.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# folder -> import name
PACKAGES = {
    "triton_kernels": "thaw_kernels",
    "thaw_agents_core": "thaw_agents_core",
    "thaw_agents": "thaw_agents",
}

# The core's subpackages, lowest first: each may import only itself and those before it.
LAYERS = [
    "util",
    "snapshot",
    "store",
    "transport",
    "weights",
    "connector",
    "engine",
    "pool",
    "fork",
]
# The core's top-level modules: exempt from LAYERS, and imported by none of the subpackages.
TOP_LEVEL = {"thaw_agents_core", "thaw_agents_core.testing"}

# package -> top-level import names it must never import ("x*": any name starting with x).
FORBIDDEN = {
    "thaw_kernels": ["vllm", "thaw_agents_core", "thaw_agents"],
    "thaw_agents_core": ["langchain", "langchain_*", "langgraph", "langgraph_*", "thaw_agents"],
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the module imported (the most specific of ours that the statement names)
    where: str  # path:line

    def __str__(self) -> str:
        return f"{self.where}: {self.module} imports {self.target}"


def find_modules() -> dict[str, Path]:
    """Every module of the three packages: dotted import name -> file."""
    modules = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((name, *parts))] = path
    return modules


def read_imports(
    module: str, source: str, *, is_package: bool, ours: set[str], where: str = ""
) -> list[Import]:
    """Every import statement anywhere in ``source`` (relative ones resolved)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            targets = [
                f"{parent}.{alias.name}" if f"{parent}.{alias.name}" in ours else parent
                for alias in node.names
            ]
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
        ):
            targets = [node.args[0].value]
        else:
            continue
        found += [Import(module, target, f"{where}:{node.lineno}") for target in targets]
    return found


MODULES = find_modules()
IMPORTS = [
    imp
    for module, path in MODULES.items()
    for imp in read_imports(
        module,
        path.read_text(),
        is_package=path.name == "__init__.py",
        ours=set(MODULES),
        where=str(path.relative_to(ROOT)),
    )
]


def package_of(module: str) -> str:
    return module.split(".")[0]


def forbidden(top: str, banned: list[str]) -> bool:
    return any(top.startswith(b[:-1]) if b.endswith("*") else top == b for b in banned)


def core_layer(module: str) -> str | None:
    """The core subpackage ``module`` belongs to; None outside the core or at its top level."""
    parts = module.split(".")
    return parts[1] if parts[0] == "thaw_agents_core" and module not in TOP_LEVEL else None


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path a -> ... -> a) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [cycle_in(graph, set(c)) for c in components]


def cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside it."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph.get(v, set()) & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    following.append(w)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not strongly connected")


# ---------------------------------------------------------------------- the checker itself


def test_every_module_is_read():
    assert {package_of(m) for m in MODULES} == set(PACKAGES.values())
    assert {
        "thaw_agents.chat_model",
        "thaw_agents_core.engine.engine",
        "thaw_kernels.kv_blocks",
    } <= set(MODULES)
    assert len(IMPORTS) > 100


def test_relative_function_level_and_string_imports_are_resolved():
    ours = {"a", "a.b", "a.b.c", "a.x", "a.x.y"}
    source = (
        "from . import c\nfrom ..x import y\nfrom .. import x\n"
        "def f():\n    from .c import name\n    import os.path\n"
        "    importlib.import_module('a.x')\n"
    )
    got = [i.target for i in read_imports("a.b.m", source, is_package=False, ours=ours)]
    assert sorted(got) == sorted(["a.b.c", "a.x.y", "a.x", "a.b.c", "os.path", "a.x"])
    # in a package's __init__, "." is the package itself
    (inside,) = read_imports("a.b", "from .c import z", is_package=True, ours=ours)
    assert inside.target == "a.b.c"


def test_cycle_finder_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


# ---------------------------------------------------------------------- the rules


def test_layer_table_names_every_core_subpackage():
    subpackages = {
        p.name for p in (ROOT / "thaw_agents_core").iterdir() if (p / "__init__.py").is_file()
    }
    assert subpackages == set(LAYERS), "a new subpackage needs its place in LAYERS"
    top_level = {m for m in MODULES if m.startswith("thaw_agents_core") and core_layer(m) is None}
    assert top_level == TOP_LEVEL, "a new top-level module of the core: decide its layer"


@pytest.mark.parametrize("package", list(FORBIDDEN))
def test_package_imports_nothing_above_it(package: str):
    bad = [
        str(i)
        for i in IMPORTS
        if package_of(i.module) == package and forbidden(package_of(i.target), FORBIDDEN[package])
    ]
    assert bad == []


def test_core_subpackages_import_only_downwards():
    bad = []
    for imp in IMPORTS:
        layer = core_layer(imp.module)
        if layer is None or package_of(imp.target) != "thaw_agents_core":
            continue
        target_layer = core_layer(imp.target)
        if target_layer is None:
            bad.append(f"{imp} (the core's top level)")
        elif LAYERS.index(target_layer) > LAYERS.index(layer):
            bad.append(f"{imp} ({target_layer} is above {layer})")
    assert bad == []


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        if imp.target in MODULES and imp.target != imp.module:
            graph[imp.module].add(imp.target)
    assert [" -> ".join(cycle) for cycle in find_cycles(graph)] == []
