"""Every third-party module procsky imports is a declared dependency (issue 17).

A module that arrives only through another package (``astropy_healpix`` came with
``reproject`` in the test extra) works in the developers' environments and fails on a
user's fresh install. These tests read the imports with ``ast`` (nothing is imported),
map module names to distributions with :func:`importlib.metadata.packages_distributions`,
and compare with ``pyproject.toml``:

* an import in ``procsky/`` must be declared in the core dependencies or in a runtime
  extra (``sim``, ``hpc``, ``postgres``), never only in ``test`` or ``bench``;
* an import from a runtime extra must be lazy (inside a function or a ``try``), and a
  missing extra fails with a message naming it (``pip install 'procsky[sim]'``);
* an import in ``tests/`` (``pytest.importorskip`` included) must be declared in the core
  dependencies or the ``test`` extra;
* every core dependency is used.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_EXTRAS = ("sim", "hpc", "postgres")

#: Modules procsky loads without an import statement:
#: module -> (extra or "core", file, text of that file that shows the use, why).
#: The test checks that the file still holds the text, so the table cannot go stale.
DYNAMIC_IMPORTS = {
    "dask_jobqueue": (
        "hpc",
        "procsky/pipeline/clusters.py",
        '"dask_jobqueue"',
        "importlib.import_module of a batch cluster class",
    ),
    "psycopg": ("postgres", "procsky/repo/registry.py", "postgresql+psycopg", "SQLAlchemy's PostgreSQL dialect"),
    "bokeh": (
        "core",
        "procsky/pipeline/clusters.py",
        "def dashboard_status",
        "distributed serves the dashboard that `procsky run` links to with bokeh",
    ),
}

#: Core dependencies no procsky module imports by name, and why they are declared.
CORE_WITHOUT_IMPORT = {
    "bokeh": "distributed serves its dashboard with it (see DYNAMIC_IMPORTS)",
}


# ------------------------------------------------------------------------------ helpers
def _norm(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    assert m, f"cannot read the distribution name of requirement {req!r} in pyproject.toml"
    return _norm(m.group(1))


@cache
def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@cache
def _declared() -> dict[str, set[str]]:
    """Distribution -> groups declaring it ("core" or an extra's name)."""
    project = _project()
    out: dict[str, set[str]] = {}
    for req in project["dependencies"]:
        out.setdefault(_req_name(req), set()).add("core")
    for extra, reqs in project.get("optional-dependencies", {}).items():
        for req in reqs:
            out.setdefault(_req_name(req), set()).add(extra)
    return out


@cache
def _module_dists() -> dict[str, list[str]]:
    return packages_distributions()


def _dists(module: str) -> list[str]:
    """Distributions providing a top-level module; its own name when none is installed."""
    return [_norm(d) for d in _module_dists().get(module, [module])]


class _Imports(ast.NodeVisitor):
    """Top-level module names of the absolute imports of one file, with their context."""

    def __init__(self):
        self.found: list[tuple[str, int, bool]] = []  # (module, line, lazy)
        self._depth = 0  # functions and try blocks around the current node

    def _nested(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Try = visit_TryStar = _nested

    def visit_Import(self, node):
        for alias in node.names:
            self.found.append((alias.name.split(".")[0], node.lineno, self._depth > 0))

    def visit_ImportFrom(self, node):
        if node.level == 0 and node.module:
            self.found.append((node.module.split(".")[0], node.lineno, self._depth > 0))

    def visit_Call(self, node):
        # pytest.importorskip("photutils.aperture") is an import too
        f = node.func
        if (
            isinstance(f, ast.Attribute)
            and f.attr == "importorskip"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            self.found.append((node.args[0].value.split(".")[0], node.lineno, True))
        self.generic_visit(node)


def _third_party_imports(folder: str) -> list[tuple[str, str, int, bool]]:
    """(module, file:line, lazy) of the third-party imports of every ``*.py`` under ``folder``."""
    base = ROOT / folder
    local = {p.stem for p in base.rglob("*.py")} | {"procsky", "__future__"}
    out = []
    for path in sorted(base.rglob("*.py")):
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        for module, line, lazy in visitor.found:
            if module in sys.stdlib_module_names or module in local:
                continue
            out.append((module, f"{path.relative_to(ROOT)}:{line}", line, lazy))
    return out


def _groups(module: str) -> set[str]:
    return set().union(*(_declared().get(d, set()) for d in _dists(module)))


# ------------------------------------------------------------------------------ tests
def test_procsky_imports_are_declared_for_users():
    allowed = {"core", *RUNTIME_EXTRAS}
    bad = []
    for module, where, _, _ in _third_party_imports("procsky"):
        groups = _groups(module)
        if not groups & allowed:
            bad.append(
                f"{where}: imports {module!r} (distribution {'/'.join(_dists(module))}), declared in "
                f"{sorted(groups) or 'nothing'}"
            )
    assert not bad, (
        "procsky imports modules a user's install does not get; add each to [project] dependencies "
        "(or to the runtime extra that needs it and import it lazily) in pyproject.toml:\n  " + "\n  ".join(bad)
    )


def test_extra_only_imports_are_lazy():
    bad = []
    for module, where, _, lazy in _third_party_imports("procsky"):
        groups = _groups(module)
        if "core" not in groups and groups & set(RUNTIME_EXTRAS) and not lazy:
            bad.append(f"{where}: {module!r} (extra {sorted(groups & set(RUNTIME_EXTRAS))})")
    assert not bad, (
        "modules of an optional extra are imported at module level, so `import procsky...` fails "
        "without the extra; import them inside the function that needs them, or in a try that "
        "re-raises with \"pip install 'procsky[EXTRA]'\":\n  " + "\n  ".join(bad)
    )


def test_dynamic_imports_are_declared():
    for module, (group, where, mention, why) in DYNAMIC_IMPORTS.items():
        text = (ROOT / where).read_text()
        assert mention in text, f"{where} no longer holds {mention!r}; update DYNAMIC_IMPORTS ({module}: {why})"
        where_declared = "[project] dependencies" if group == "core" else f"the {group!r} extra"
        assert group in _groups(module), f"{module} ({why}) must be declared in {where_declared}"


def test_core_dependencies_are_used():
    imported = {d for module, *_ in _third_party_imports("procsky") for d in _dists(module)}
    imported |= {_norm(d) for d in CORE_WITHOUT_IMPORT}
    unused = sorted(_req_name(r) for r in _project()["dependencies"] if _req_name(r) not in imported)
    assert not unused, (
        f"core dependencies {unused} are not imported by procsky; remove them from pyproject.toml "
        "or say in CORE_WITHOUT_IMPORT (tests/test_dependencies.py) why a user needs them"
    )


def test_test_imports_are_declared():
    bad = []
    for module, where, _, _ in _third_party_imports("tests"):
        if not _groups(module) & {"core", "test"}:
            bad.append(f"{where}: {module!r}")
    assert not bad, "tests import modules missing from the core dependencies and the test extra:\n  " + "\n  ".join(bad)


def test_bokeh_requirement_satisfies_distributed():
    """`procsky run` prints the dashboard link: the declared bokeh must be one distributed accepts."""
    from distributed.versions import BOKEH_REQUIREMENT

    reqs = [r for r in _project()["dependencies"] if _req_name(r) == "bokeh"]
    assert reqs, f"declare bokeh ({BOKEH_REQUIREMENT}) in [project] dependencies"
    req = reqs[0]
    m = re.search(r">=\s*([0-9][0-9.]*)", req)
    assert m, f"declare a minimum bokeh version (got {req!r})"
    assert BOKEH_REQUIREMENT.specifier.contains(m.group(1)), (
        f"distributed needs {BOKEH_REQUIREMENT} for its dashboard; pyproject.toml allows {req!r}"
    )


# ------------------------------------------------------------------------------ missing extras
def _hide(monkeypatch, module: str, *reimport: str) -> None:
    """Make ``import module`` fail, and forget the procsky modules that must re-import it."""
    monkeypatch.setitem(sys.modules, module, None)
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in reimport):
            monkeypatch.delitem(sys.modules, name)


def test_missing_sim_extra_names_it(monkeypatch):
    _hide(monkeypatch, "galsim", "procsky.sim")
    with pytest.raises(ImportError, match=re.escape("pip install 'procsky[sim]'")):
        import procsky.sim  # noqa: F401


# The hpc extra's message: tests/test_preflight.py::test_missing_jobqueue_names_the_extra.


def test_missing_postgres_extra_names_it(monkeypatch):
    from procsky.errors import ProcskyError
    from procsky.repo.registry import Registry

    _hide(monkeypatch, "psycopg")
    with pytest.raises(ProcskyError, match=re.escape("pip install 'procsky[postgres]'")):
        Registry("postgresql+psycopg://nobody@127.0.0.1:1/none")
