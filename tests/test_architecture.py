"""The map of docs/ARCHITECTURE.md holds: no import cycle between any two modules (imports inside functions
count), and an import inside a function only defers a heavy optional dependency, with the reason beside it.

`lint-imports` (run by .ci/run) checks the layers; this test checks what its contracts cannot: cycles between
single modules of one package and imports hidden in functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = {
    "coalign": REPO / "coalign",
    "coalign.datamodules": REPO / "datamodules",
    "coalign.synthesis": REPO / "synthesis",
}


def _module_name(path: Path) -> str:
    for package, folder in SOURCES.items():
        if path.is_relative_to(folder):
            parts = path.relative_to(folder).with_suffix("").parts
            return ".".join([package, *parts]).removesuffix(".__init__")
    raise AssertionError(path)


def _files() -> dict[str, Path]:
    return {_module_name(p): p for folder in SOURCES.values() for p in sorted(folder.rglob("*.py"))}


def _imported(module: str, path: Path, node: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    """Project modules an import statement loads (a package's __init__ counts as the package)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
            for _ in range(node.level - 1):
                package = package.rsplit(".", 1)[0]
            base = f"{package}.{base}".rstrip(".")
        # "from pkg import mod" loads pkg.mod; "from pkg import name" loads pkg (its __init__)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = set()
    for name in names:
        while name and name not in modules:  # "pkg.mod.attr" -> "pkg.mod"
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    files = _files()
    modules = set(files)
    graph = {}
    for module, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _imported(module, path, node, modules)
        # importing a submodule runs its parent packages' __init__ too: that is an edge, but to the package
        # itself, which is how the cycle through a re-exporting __init__ shows up
        graph[module] = edges - {module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for child in sorted(graph[node]):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_between_modules():
    graph = _graph()
    assert len(graph) > 60 and "coalign.datamodules.cirr" in graph and "coalign.synthesis.filter" in graph
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _function_imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    yield inner


def test_imports_inside_functions_only_defer_heavy_optional_dependencies():
    problems = []
    for folder in SOURCES.values():
        for path in sorted(folder.rglob("*.py")):
            lines = path.read_text(encoding="utf-8").splitlines()
            for node in _function_imports(path):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                where = f"{_module_name(path)}:{node.lineno}"
                if isinstance(node, ast.ImportFrom) and node.level or any(n.split(".")[0] == "coalign" for n in names):
                    problems.append(f"{where} imports a coalign module inside a function")
                    continue
                reason = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                if not reason:
                    problems.append(f"{where} imports {names} inside a function without a one-line reason")
    assert problems == []
