"""The layering of DESIGN.md, checked: no import cycles, dependencies point one way, types pass.

* The modules of ``blackbird``, ``actors`` and ``projections`` import each other without a
  cycle, counting every import in a file: at module level, under ``if TYPE_CHECKING:`` and
  inside functions.
* ``actors`` (the pure rules and the actor host) imports nothing of ``blackbird`` or
  ``projections`` and no I/O library; ``projections`` imports nothing of ``blackbird``.
* ``mypy --strict`` passes on every package (``blackbird``, ``actors``, ``projections``).
* Every module of ``actors``, ``projections`` and ``blackbird/audit`` opens with a docstring
  whose first line says what the module is for.

The checks read the source with :mod:`ast` and import nothing, so they see imports that
never run (``TYPE_CHECKING``, unused branches) and cannot be fooled by import order.
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("blackbird", "actors", "projections")

#: Libraries that do I/O (network, disk, terminal) or run the event loop: the pure core
#: (``actors``) stays free of them, so its rules run anywhere and replay deterministically.
IO_LIBRARIES = frozenset(
    {
        "anyio", "asyncio", "httpx", "lancedb", "nats", "pyarrow", "socket", "starlette",
        "structlog", "subprocess", "uvicorn",
    }
)

#: The one module of ``actors`` allowed some of them, and which. The actor host runs each
#: actor's mailbox as a task in an anyio task group and logs with structlog; its journal and
#: snapshot store (the real I/O) come in as the protocols of ``actors.ports``.
IO_ALLOWED = {"actors.host": frozenset({"anyio", "structlog"})}

#: Modules whose docstring is checked (see ``test_every_module_opens_with_its_purpose``).
DOCUMENTED = ("actors", "projections", "blackbird")

class Import(NamedTuple):
    """One import statement's target, as written but made absolute."""

    importer: str  # dotted module name of the importing file
    target: str  # dotted name imported (``a.b`` for ``import a.b`` and ``from a.b import c``)
    names: tuple[str, ...]  # for ``from a.b import c, d``: ("c", "d"); empty for ``import``
    line: int


def find_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under the ``packages`` of ``root``
    (a package's ``__init__.py`` is the package's own name)."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imports_of(module: str, path: Path) -> Iterator[Import]:
    """Every import statement anywhere in the file, relative ones made absolute."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # ``from . import x`` in a package's __init__ is relative to the package itself
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield Import(module, target, tuple(a.name for a in node.names), node.lineno)


def import_graph(modules: Mapping[str, Path]) -> dict[str, dict[str, int]]:
    """importer -> {imported module: line of the first such import}, over ``modules`` only.

    ``import a.b.c`` and ``from a.b.c import x`` are edges to ``a.b.c``, plus ``a.b.c.x`` when
    ``x`` is a submodule. Python also runs ``a/__init__`` and ``a/b/__init__`` on the way,
    but those are not counted as edges: only the module named is. Otherwise every module
    of a package whose ``__init__`` re-exports its submodules would be in a cycle with it,
    which says nothing about the modules' own dependencies; an import from the package
    itself (``from blackbird import x``) is an edge to the ``__init__``, as written.
    """
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, path in modules.items():
        for imp in imports_of(name, path):
            targets = [imp.target, *(f"{imp.target}.{n}" for n in imp.names)]
            for target in targets:
                if target in modules and target != name:
                    graph[name].setdefault(target, imp.line)
    return graph


def cycles(graph: Mapping[str, Mapping[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module, each sorted (Tarjan's
    algorithm, iterative so a deep graph does not hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def shortest_cycle(graph: Mapping[str, Mapping[str, int]], component: list[str]) -> list[str]:
    """One shortest cycle through the component's first module, closed (first == last)."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        next_frontier = []
        for node in frontier:
            for succ in sorted(graph[node]):
                if succ == start:
                    return [*paths[node], start]
                if succ in members and succ not in paths:
                    paths[succ] = [*paths[node], succ]
                    next_frontier.append(succ)
        frontier = next_frontier
    raise AssertionError(f"{component} is not strongly connected")


def describe_cycles(graph: Mapping[str, Mapping[str, int]]) -> str:
    """Each cycle's modules, and one path through it with the line of each import."""
    lines = []
    for component in cycles(graph):
        path = shortest_cycle(graph, component)
        steps = " -> ".join(f"{a} (line {graph[a][b]})" for a, b in itertools.pairwise(path))
        lines.append(f"cycle among {', '.join(component)}:\n    {steps} -> {path[-1]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the tests


def test_module_graph_has_no_import_cycles() -> None:
    found = describe_cycles(import_graph(find_modules(ROOT, PACKAGES)))
    assert not found, f"import cycles (TYPE_CHECKING and function-level imports count):\n{found}"


def test_cycle_check_sees_type_checking_and_function_level_imports(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text('"""pkg"""\n')
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n"
    )
    (package / "b.py").write_text("def f():\n    from . import c\n")
    (package / "c.py").write_text("import pkg.a\n")
    (package / "d.py").write_text("from pkg import a\n")  # into the cycle, not part of it
    graph = import_graph(find_modules(tmp_path, ("pkg",)))
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert graph["pkg.d"] == {"pkg": 1, "pkg.a": 1}  # ``from pkg import a``: both named modules
    assert "pkg.a (line 3) -> pkg.b (line 2) -> pkg.c (line 1) -> pkg.a" in describe_cycles(graph)


def test_actors_import_nothing_of_blackbird_projections_or_io_libraries() -> None:
    wrong = []
    for name, path in find_modules(ROOT, ("actors",)).items():
        allowed = IO_ALLOWED.get(name, frozenset())
        for imp in imports_of(name, path):
            top = imp.target.split(".")[0]
            if top in ("blackbird", "projections") or (top in IO_LIBRARIES and top not in allowed):
                wrong.append(f"{path.relative_to(ROOT)}:{imp.line} imports {imp.target}")
    assert not wrong, "actors must stay pure:\n" + "\n".join(wrong)


def test_projections_import_nothing_of_blackbird() -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{imp.line} imports {imp.target}"
        for name, path in find_modules(ROOT, ("projections",)).items()
        for imp in imports_of(name, path)
        if imp.target.split(".")[0] == "blackbird"
    ]
    assert not wrong, "projections sit below blackbird:\n" + "\n".join(wrong)


def test_every_module_opens_with_its_purpose() -> None:
    missing = []
    for name, path in find_modules(ROOT, PACKAGES).items():
        if not any(name == p or name.startswith(p + ".") for p in DOCUMENTED):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        lines = doc.splitlines() or [""]
        # a summary line: a whole sentence of a few words, then a blank line if more follows
        summary = lines[0]
        if len(summary.split()) < 4 or not summary.endswith(".") or lines[1:2] not in ([], [""]):
            missing.append(f"{path.relative_to(ROOT)}: {summary or 'no docstring'!r}")
    assert not missing, "modules without a one-line statement of purpose:\n" + "\n".join(missing)


def test_mypy_strict_passes_on_every_package() -> None:
    # The whole library, pure core and edges alike, is checked strictly (pyproject.toml's
    # [tool.mypy] names the files and the few untyped libraries).
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, f"mypy --strict failed:\n{result.stdout}{result.stderr}"


def test_ruff_finds_nothing() -> None:
    # The rule set (pycodestyle, pyflakes, isort, bugbear, pyupgrade) is in pyproject.toml.
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, f"ruff found problems:\n{result.stdout}{result.stderr}"
