"""Fail if the package's modules import each other in a cycle.

Usage: ``python tools/import_cycles.py [package_dir]`` (default ``asyncckpt``). Every import of
an ``asyncckpt`` module counts, at the top of a module or inside a function, except those under
``if TYPE_CHECKING:``; a package's ``__init__`` counts as a module of its own. Prints each cycle
found and exits 1, or prints the module count and exits 0.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, name: str, is_package: bool, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            for alias in node.names:  # "from . import x" imports the submodule x
                found.add(f"{target}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    out = set()
    for target in found:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return cycles


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else "asyncckpt").resolve()
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    known = set(files)
    graph = {
        name: imports_of(path, name, path.name == "__init__.py", known)
        for name, path in files.items()
    }
    # A package's __init__ importing its own submodules is how re-exports work, and a
    # submodule importing a sibling goes through the package: neither is a cycle of ours.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    cycles = find_cycles(graph)
    for cycle in cycles:
        print("import cycle among:", ", ".join(cycle))
    if cycles:
        return 1
    print(f"no import cycle among {len(files)} modules of {root.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
