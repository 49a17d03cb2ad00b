"""Static structure checks over opdx/: no import circles (read with ast, nothing is imported)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "opdx"



def module_names(package: Path) -> dict[str, tuple[Path, bool]]:
    """dotted name -> (file, is_package) for every .py file under ``package``."""
    out = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def imported_modules(name: str, path: Path, is_package: bool, known: set[str], lazy: bool) -> set[str]:
    """The modules of ``known`` that module ``name`` imports: at module level, and inside functions when ``lazy``.
    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = name if is_package else name.rpartition(".")[0]
    nodes = ast.walk(tree) if lazy else tree.body
    targets = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in known else base)
    return {t for t in targets if t in known and t != name}


def import_graph(package: Path, *, lazy: bool) -> dict[str, set[str]]:
    modules = module_names(package)
    known = set(modules)
    return {name: imported_modules(name, path, is_pkg, known, lazy) for name, (path, is_pkg) in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. every import circle."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(graph, component) -> str:
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & component))}" for m in sorted(component))


def test_no_import_cycles_at_module_level():
    graph = import_graph(PACKAGE, lazy=False)
    found = cycles(graph)
    assert not found, "import circles in opdx/: " + " | ".join(describe(graph, c) for c in found)


def test_no_import_cycles_counting_imports_inside_functions():
    """A circle through a lazy import is still a circle in the design."""
    graph = import_graph(PACKAGE, lazy=True)
    found = cycles(graph)
    assert not found, "import circles in opdx/ (lazy imports counted): " + " | ".join(
        describe(graph, c) for c in found)


def test_cycle_finder_sees_circles(tmp_path):
    """The checker itself: a lazy circle a <-> b through a relative import, and a module-level one c -> d -> e -> c."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("import pkg.a\n")
    (pkg / "c.py").write_text("from pkg.d import x\n")
    (pkg / "d.py").write_text("from pkg import e\n")
    (pkg / "e.py").write_text("from .c import y\n")
    assert set(cycles(import_graph(pkg, lazy=False))) == {frozenset({"pkg.c", "pkg.d", "pkg.e"})}
    assert set(cycles(import_graph(pkg, lazy=True))) == {frozenset({"pkg.a", "pkg.b"}),
                                                         frozenset({"pkg.c", "pkg.d", "pkg.e"})}
