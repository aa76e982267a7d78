"""The import graph of compscale has layers and no cycles: trace -> analyse -> plan -> rewrite -> verify, each importing
only from its own layer or below, lazy imports (inside functions) included; imports under ``if TYPE_CHECKING:`` do not
count. And ``import compscale`` stays light.

Layers, bottom to top: the base modules (``errors``, ``arguments``, ``layers``, ``registry``, ``transforms``), then the
packages ``trace``, ``analyse``, ``planning``, ``rewrite``, ``verify``, then everything else in ``compscale/`` (the
orchestration: ``pipeline``, ``api``, ``cli``, ``__init__``, ``__main__``...).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "compscale"
BASE = ("errors", "arguments", "layers", "randomness", "registry", "transforms")
PACKAGES = ("trace", "analyse", "planning", "rewrite", "verify")
LAYER_NAMES = ("base", *PACKAGES, "top")
HEAVY = ("torchvision", "timm", "transformers", "matplotlib")


class Import(NamedTuple):
    source: str  # the importing module
    target: str  # the module imported
    path: Path
    line: int
    lazy: bool  # inside a function

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    parts = module.split(".")[1:]
    if len(parts) == 1 and parts[0] in BASE:
        return 0
    if parts and parts[0] in PACKAGES:
        return PACKAGES.index(parts[0]) + 1
    return len(LAYER_NAMES) - 1


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """Every import of a compscale module in one file, at any depth, except under ``if TYPE_CHECKING:``."""

    def __init__(self, module: str, path: Path, modules: set[str]) -> None:
        self.module, self.path, self.modules = module, path, modules
        self.package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        self.depth = 0
        self.found: list[Import] = []

    def _add(self, target: str, node: ast.stmt) -> None:
        if target == "compscale" or target.startswith("compscale."):
            self.found.append(Import(self.module, target, self.path, node.lineno, self.depth > 0))

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:  # relative: from the importing module's package up
            base = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        # `from compscale.x import y`: the module compscale.x.y where y is one, else compscale.x
        subs = {f"{source}.{alias.name}" for alias in node.names}
        for target in sorted({sub if sub in self.modules else source for sub in subs}):
            self._add(target, node)


def _imports() -> list[Import]:
    paths = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
    modules = {_module_name(p) for p in paths}
    found: list[Import] = []
    for path in paths:
        visitor = _Imports(_module_name(path), path, modules)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        found += visitor.found
    return found


def _upward(imports: list[Import]) -> list[str]:
    return [f"{i.where()}: {i.source} ({LAYER_NAMES[_layer(i.source)]}) imports {i.target} "
            f"({LAYER_NAMES[_layer(i.target)]}){' lazily' if i.lazy else ''}"
            for i in imports if _layer(i.target) > _layer(i.source)]


def _cycles(imports: list[Import]) -> list[str]:
    """Each strongly connected set of modules (Tarjan's algorithm), with one cycle through it. A package's
    ``__init__`` importing its own submodules is no edge (Python runs the package first)."""
    edges: dict[str, dict[str, Import]] = {}
    for i in imports:
        own = i.path.name == "__init__.py" and i.target.startswith(i.source + ".")
        if i.target != i.source and not own:
            edges.setdefault(i.source, {}).setdefault(i.target, i)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, {}):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [f"cycle among {', '.join(c)}: {_one_cycle(c, edges)}" for c in components]


def _one_cycle(component: list[str], edges: dict[str, dict[str, Import]]) -> str:
    """One cycle through the first module of ``component``, each import named where it is."""
    members, start = set(component), component[0]
    came: dict[str, Import] = {}
    queue = [start]
    while queue:  # breadth first, within the component, back to start
        v = queue.pop(0)
        for w, i in edges.get(v, {}).items():
            if w in members and w not in came:
                came[w] = i
                queue.append(w)
        if start in came:
            break
    hops, v = [], start
    while True:
        i = came[v]
        hops.append(f"{i.source} -> {i.target} ({i.where()}{', lazy' if i.lazy else ''})")
        v = i.source
        if v == start:
            break
    return "; ".join(reversed(hops))


def test_imports_go_down_the_layers_without_cycles() -> None:
    imports = _imports()
    assert len({i.source for i in imports}) > 20, "found too few modules: has the package moved?"
    upward, cycles = _upward(imports), _cycles(imports)
    if upward or cycles:  # every violation in one message
        pytest.fail("\n".join([f"{len(upward)} import(s) to a higher layer ({' < '.join(LAYER_NAMES)}):", *upward,
                               f"{len(cycles)} import cycle(s):", *cycles]), pytrace=False)


def test_import_compscale_imports_no_heavy_library() -> None:
    code = f"import sys, compscale; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True, timeout=60)
    assert out.stdout.split() == [], f"`import compscale` imports {out.stdout.split()}"
