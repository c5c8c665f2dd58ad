"""Count the import circles between the package's own modules (grimp's graph, module level).

Every import counts, inside functions too, except those under ``if TYPE_CHECKING:``.  A circle is
a strongly connected component of more than one module; the script prints each one and exits 1
when there is any.  It also counts the imports of
the package's own modules made inside functions (``-v`` lists them).
Usage: ``python .ci/cycles.py [-v] [package]``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import grimp


def components(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Tarjan's strongly connected components over the module graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in graph.find_modules_directly_imported_by(m):
            if n not in modules:
                continue
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            comp = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                comp.append(n)
                if n == m:
                    break
            found.append(comp)

    for m in sorted(modules):
        if m not in index:
            visit(m)
    return [sorted(c) for c in found if len(c) > 1]


def imports_in_functions(package: str) -> list[str]:
    """``file:line`` of each import of the package's own modules made inside a function."""
    found = []
    for path in sorted(Path(package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                own = (isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith(package))
                       or isinstance(node, ast.Import) and any(a.name.startswith(package) for a in node.names))
                if own:
                    found.append(f"{path}:{node.lineno}")
    return sorted(set(found))


def main() -> int:
    package = next((a for a in sys.argv[1:] if not a.startswith("-")), "xml_pipeline_llm")
    graph = grimp.build_graph(package, exclude_type_checking_imports=True)
    # A package's __init__ re-exports its modules; the package itself is not a layer of its own.
    modules = {m for m in graph.modules if m != package}
    circles = components(graph, modules)
    for c in circles:
        print(f"{len(c)} modules: {', '.join(c)}")
    print(f"{len(circles)} import circle(s)")
    inner = imports_in_functions(package)
    if "-v" in sys.argv:
        print("\n".join(inner))
    print(f"{len(inner)} import(s) of the package's own modules inside functions")
    return 1 if circles else 0


if __name__ == "__main__":
    sys.exit(main())
