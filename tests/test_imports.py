"""forerun's import graph, read from the source with ast (nothing is imported): no module imports
one that leads back to it, lazy imports inside functions included, and no module takes a private
name (`_name`) from a module of another package."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "forerun"


def forerun_modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module under `root` (a package is named by its __init__.py)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def package_of(name: str, modules: dict[str, Path]) -> str:
    return name if name in modules and modules[name].name == "__init__.py" else name.rpartition(".")[0]


def imports_of(name: str, path: Path, modules: dict[str, Path]):
    """(imported module, names taken from it, line) for every forerun import in the file, at any depth."""
    package = package_of(name, modules)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "forerun":
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "forerun":
                continue
            names = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # `from forerun.drafters import pld` imports a module
                    yield sub, [], node.lineno
                else:
                    names.append(alias.name)
            if names:
                yield base, names, node.lineno


def import_graph(root: Path = ROOT) -> tuple[dict[str, dict[str, int]], list[str]]:
    """module -> {imported module: first line}, and the private names taken across packages."""
    modules = forerun_modules(root)
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    private = []
    for name, path in modules.items():
        for target, names, line in imports_of(name, path, modules):
            if target not in modules:
                continue  # a name forerun does not define (an optional dependency's, say)
            if target != name:
                graph[name].setdefault(target, line)
            if package_of(target, modules) != package_of(name, modules):
                where = f"{path.relative_to(root.parent).as_posix()}:{line}"
                for taken in names:
                    if taken.startswith("_") and not (taken.startswith("__") and taken.endswith("__")):
                        private.append(f"{where}: from {target} import {taken}")
    return graph, private


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's components of more than one module (a self-import is skipped when building the graph)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def a_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """One cycle through the component's first module, found breadth-first (so a shortest one)."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w in members and w not in came_from:
                    came_from[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return "\n".join(f"  {a} (line {graph[a][b]}) imports {b}" for a, b in zip(cycle, cycle[1:]))


def test_forerun_has_no_import_cycle():
    graph, _ = import_graph()
    found = []
    for component in strongly_connected(graph):
        cycle = a_cycle(graph, component)
        others = sorted(set(component) - set(cycle))
        found.append(describe(graph, cycle) + (f"\n  (more cycles run through {', '.join(others)})" if others else ""))
    assert not found, "import cycles among forerun's modules:\n" + "\n\n".join(found)


def test_no_private_name_is_imported_from_another_package():
    _, private = import_graph()
    assert not private, "private names imported across packages:\n  " + "\n  ".join(private)


def test_the_drafter_registry_names_the_module_of_every_drafter():
    """The registry imports a drafter's module only when its method is built, from a table: a
    drafter file the table missed would never be found."""
    from forerun.drafters.registry import BUILTIN_MODULES

    registered = {}
    for path in sorted((ROOT / "drafters").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register" and node.args:
                registered[node.args[0].value] = path.stem
    assert registered == BUILTIN_MODULES


def test_the_checks_see_lazy_imports_and_private_names(tmp_path):
    """A cycle closed only by an import inside a function, and a private import, are both found."""
    source = {"a.py": "import forerun.b\n", "b.py": "def f():\n    from forerun.a import thing\n",
              "c/__init__.py": "", "c/d.py": "from forerun.a import _hidden\nfrom .e import _ok\n", "c/e.py": ""}
    root = tmp_path / "forerun"
    for name, text in source.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph, private = import_graph(root)
    assert [a_cycle(graph, c) for c in strongly_connected(graph)] == [["forerun.a", "forerun.b", "forerun.a"]]
    assert private == ["forerun/c/d.py:1: from forerun.a import _hidden"]
