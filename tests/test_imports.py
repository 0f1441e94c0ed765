"""No import cycles among procsky modules.

The import graph is built from the source with :mod:`ast` (nothing is imported): an edge
A -> B for every ``import B`` / ``from B import x`` in module A, at module level or inside a
function, skipping ``if TYPE_CHECKING:`` blocks. Relative imports are resolved; ``from pkg
import name`` where ``pkg.name`` is a module counts as importing ``pkg.name`` (otherwise as
importing ``pkg``). Importing a submodule does not add an edge to its parent packages, so a
package ``__init__`` that re-exports its submodules does not close a cycle by itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "procsky"


def _modules() -> dict[str, Path]:
    """Module name -> source file of every procsky module."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the procsky modules it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = name.split(".")
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = []
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    targets.append(sub if sub in modules else target)
            for t in targets:
                # `import procsky.a.b` names procsky.a.b; fall back to the longest known prefix
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each with
    one cycle through it, as ``[a, b, ..., a]``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    import sys

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10000))
    try:
        for v in sorted(graph):
            if v not in index:
                strongconnect(v)
    finally:
        sys.setrecursionlimit(old)
    return [_one_cycle(graph, comp) for comp in components]


def _one_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return list(reversed(path)) + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def test_graph_sees_imports():
    graph = import_graph()
    assert "procsky.tasks.base" in graph["procsky.pipeline.pipeline"]
    assert "procsky.instruments.base" in graph["procsky.instruments.generic"]
    assert not any(m.startswith("procsky.pipeline") for m in graph["procsky.tasks.base"]), (
        "tasks sit below the pipeline: procsky.tasks.base must not import procsky.pipeline"
    )
    assert graph["procsky.tasks"] == set(), "procsky.tasks must not import the stage modules"


def test_find_cycles_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    text = "\n".join(" -> ".join(c) for c in cycles)
    assert not cycles, f"{len(cycles)} import cycle(s) among procsky modules:\n{text}"


STAGE_MODULES = (
    "procsky.isr",
    "procsky.calibrate",
    "procsky.photometry",
    "procsky.warp",
    "procsky.coadd",
    "procsky.diffim",
)


def _external_imports(path: Path) -> set[str]:
    """Top-level names of the packages ``path`` imports (absolute imports only)."""
    return {
        alias.name.split(".")[0] if isinstance(node, ast.Import) else (node.module or "").split(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path)))
        if not getattr(node, "level", 0)
        for alias in node.names
    }


def test_layers_point_down():
    """kernels <- stage modules <- tasks <- pipeline: no layer imports one above it, kernels
    import no dask and nothing of procsky outside procsky.kernels."""
    graph = import_graph()
    modules = _modules()
    bad = []
    for name, deps in sorted(graph.items()):
        if name.startswith("procsky.kernels"):
            bad += [f"{name} -> {d}" for d in deps if not d.startswith("procsky.kernels")]
            bad += [f"{name} -> {p}" for p in _external_imports(modules[name]) if p in ("dask", "distributed")]
        if name == "procsky.tasks" or name.startswith("procsky.tasks."):
            bad += [f"{name} -> {d}" for d in deps if d.startswith(("procsky.pipeline", "procsky.cli"))]
        if name.startswith(STAGE_MODULES):
            bad += [
                f"{name} -> {d}" for d in deps if d.startswith(("procsky.pipeline", "procsky.cli", "procsky.tasks"))
            ]
    assert not bad, "imports that point up a layer:\n" + "\n".join(bad)


def test_kernels_reexports_are_lazy():
    """``procsky.kernels`` re-exports its names lazily (PEP 562): every name resolves, and a
    coadd worker's imports load no cosmic-ray, detection, measurement or PSF-fitting kernels
    (nor scipy.optimize, which the parametric PSF fit imports)."""
    import subprocess
    import sys

    import procsky.kernels as k

    assert set(k.__all__) == set(k._EXPORTS)
    for name in k.__all__:
        assert getattr(k, name) is not None
    code = (
        "import sys, procsky.coadd, procsky.tasks.coadd, procsky.tasks.warp\n"
        "heavy = ('procsky.kernels.cosmicray', 'procsky.kernels.detection', 'procsky.kernels.measure', "
        "'procsky.kernels.psfmodel', 'procsky.kernels.astrometry', 'procsky.kernels.background', 'scipy.optimize')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]", out
