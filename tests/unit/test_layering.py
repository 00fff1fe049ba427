"""Layering of services/: imports point one way, and no module imports itself through others.

Every module under services/ is parsed with `ast` (nothing is imported); every import statement
counts: at module level, inside functions and classes (lazy imports), under `if TYPE_CHECKING:` or
`try:`. Relative imports are resolved against the importing module; `from package import name` is
an edge to `package.name` when that is a module, else to `package`. The graph keeps `services.*`
targets only and has one node per module (a package is its `__init__`, so a package re-exporting
its submodules has edges to them); importing `a.b.c` is an edge to `a.b.c` alone, not to the
packages Python runs on the way.

Layers (ARCHITECTURE.md, "Layers point one way"); a layer may import only the layers listed:

    services.common    common
    services.engine    common, engine
    services.workers   common, engine, workers
    services.router    common, router
    services.gateway   common, engine, workers, router, gateway

The top-level modules (`services`, `services.cli`, `services.serve`) may import anything, and no layer
imports them. A new top-level module must be given a place here before it passes.
"""

from __future__ import annotations

import ast
import itertools
from collections import deque
from dataclasses import dataclass
from pathlib import Path

SERVICES_DIR = Path(__file__).resolve().parents[2] / "services"

ALLOWED_LAYERS = {
    "services.common": ("services.common",),
    "services.engine": ("services.common", "services.engine"),
    "services.workers": ("services.common", "services.engine", "services.workers"),
    "services.router": ("services.common", "services.router"),
    "services.gateway": (
        "services.common",
        "services.engine",
        "services.workers",
        "services.router",
        "services.gateway",
    ),
}
TOP_LEVEL_MODULES = ("services", "services.cli", "services.serve", "services.supervisor")


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    imported: str  # dotted module name, resolved
    path: str  # the importer's file, from the root package's parent ("services/engine/llm.py")
    lineno: int

    def __str__(self) -> str:
        return f"{self.path}:{self.lineno} imports {self.imported}"


# ----------------------------------------------------------------------------------------------
# The import graph


def find_modules(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under package_dir (the root package)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def find_imports(package_dir: Path) -> tuple[dict[str, Path], list[Import]]:
    """The modules of the root package at package_dir, and every import of that package's modules."""
    root = package_dir.name
    modules = find_modules(package_dir)
    imports = []
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _import_targets(node, module, is_package, modules):
                if target == root or target.startswith(root + "."):
                    shown = path.relative_to(package_dir.parent).as_posix()
                    imports.append(Import(module, target, shown, node.lineno))
    return modules, imports


def _import_targets(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict[str, Path]
) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = _resolve_from(node, module, is_package)
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a `from ... import` reads from."""
    if node.level == 0:
        return node.module or ""
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


# ----------------------------------------------------------------------------------------------
# Checks


def layer_of(module: str) -> str | None:
    """The layer a module belongs to (`services.engine` for services.engine.kv_cache.manager), or None."""
    parts = module.split(".")
    layer = ".".join(parts[:2])
    return layer if len(parts) >= 2 and layer in ALLOWED_LAYERS else None


def layering_violations(modules: dict[str, Path], imports: list[Import]) -> list[str]:
    """A line per module without a layer and per import against the layer order."""
    problems = [
        f"{module} belongs to no layer: give it one in test_layering.py"
        for module in modules
        if layer_of(module) is None and module not in TOP_LEVEL_MODULES
    ]
    for imp in imports:
        layer = layer_of(imp.importer)
        if layer is None:  # a top-level module: may import anything
            continue
        allowed = ALLOWED_LAYERS[layer]
        if layer_of(imp.imported) not in allowed:
            problems.append(f"{imp}: {imp.importer} is in {layer}, which may import only {', '.join(allowed)}")
    return problems


def import_cycles(modules: dict[str, Path], imports: list[Import]) -> list[str]:
    """One shortest cycle for each strongly connected group of modules, each edge with its import line."""
    first_edge: dict[tuple[str, str], Import] = {}
    for imp in imports:
        if imp.imported in modules:
            first_edge.setdefault((imp.importer, imp.imported), imp)
    graph: dict[str, list[str]] = {module: [] for module in modules}
    for importer, imported in first_edge:
        graph[importer].append(imported)
    problems = []
    for group in sorted(_strongly_connected(graph)):
        if len(group) == 1 and group[0] not in graph[group[0]]:
            continue
        cycle = _shortest_cycle(group[0], graph, set(group))
        lines = [f"import cycle: {' -> '.join(cycle)}"]
        lines += [f"    {first_edge[edge]}" for edge in itertools.pairwise(cycle)]
        if len(group) > len(cycle) - 1:
            lines.append(f"    (one cycle of {len(group)} mutually dependent modules: {', '.join(group)})")
        problems.append("\n".join(lines))
    return problems


def _strongly_connected(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups = []
    for start, start_successors in graph.items():
        if start in index:
            continue
        work = [(start, iter(start_successors))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            successor = next(successors, None)
            if successor is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    groups.append(sorted(group))
            elif successor not in index:
                index[successor] = low[successor] = len(index)
                stack.append(successor)
                on_stack.add(successor)
                work.append((successor, iter(graph[successor])))
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
    return groups


def _shortest_cycle(start: str, graph: dict[str, list[str]], group: set[str]) -> list[str]:
    """[start, ..., start]: a shortest way back to start inside its group (breadth first)."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for successor in sorted(graph[node]):
            if successor == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if successor in group and successor not in came_from:
                came_from[successor] = node
                queue.append(successor)
    raise AssertionError(f"{start} is in no cycle")


# ----------------------------------------------------------------------------------------------
# The tests


def test_services_modules_import_no_higher_layer():
    modules, imports = find_imports(SERVICES_DIR)
    problems = layering_violations(modules, imports)
    assert not problems, "imports against the layer order:\n  " + "\n  ".join(problems)


def test_services_modules_have_no_import_cycles():
    modules, imports = find_imports(SERVICES_DIR)
    problems = import_cycles(modules, imports)
    assert not problems, "import cycles among services modules:\n  " + "\n  ".join(problems)


def test_the_checker_on_a_small_package_with_lazy_and_relative_imports(tmp_path):
    """The checker itself, on a small made-up `services` package."""
    files = {
        "__init__.py": "",
        "cli.py": "import services.gateway.app\n",
        "common/__init__.py": "",
        "common/wire.py": "def f():\n    from services.engine import runner  # lazy, and against the layers\n",
        "engine/__init__.py": "from .runner import Runner\n",
        "engine/runner.py": "from ..common import wire\nfrom . import Runner as _\n\nclass Runner: ...\n",
        "gateway/__init__.py": "",
        "gateway/app.py": "from services.engine import Runner\nimport services.cli\n",
        "util.py": "",
    }
    package_dir = tmp_path / "services"
    for name, text in files.items():
        (package_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (package_dir / name).write_text(text)

    modules, imports = find_imports(package_dir)

    assert sorted((i.importer, i.imported, i.lineno) for i in imports) == [
        ("services.cli", "services.gateway.app", 1),
        ("services.common.wire", "services.engine.runner", 2),
        ("services.engine", "services.engine.runner", 1),
        ("services.engine.runner", "services.common.wire", 1),
        ("services.engine.runner", "services.engine", 2),
        ("services.gateway.app", "services.cli", 2),
        ("services.gateway.app", "services.engine", 1),
    ]
    assert layering_violations(modules, imports) == [
        "services.util belongs to no layer: give it one in test_layering.py",
        (
            "services/common/wire.py:2 imports services.engine.runner: services.common.wire is in services.common, "
            "which may import only services.common"
        ),
        (
            "services/gateway/app.py:2 imports services.cli: services.gateway.app is in services.gateway, which may "
            "import only services.common, services.engine, services.workers, services.router, services.gateway"
        ),
    ]
    assert import_cycles(modules, imports) == [
        (
            "import cycle: services.cli -> services.gateway.app -> services.cli\n"
            "    services/cli.py:1 imports services.gateway.app\n"
            "    services/gateway/app.py:2 imports services.cli"
        ),
        (
            "import cycle: services.common.wire -> services.engine.runner -> services.common.wire\n"
            "    services/common/wire.py:2 imports services.engine.runner\n"
            "    services/engine/runner.py:1 imports services.common.wire\n"
            "    (one cycle of 3 mutually dependent modules: services.common.wire, services.engine, "
            "services.engine.runner)"
        ),
    ]
