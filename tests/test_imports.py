"""The package's import structure: no import circle, and every module imports only from its own floor or
below. Floors, bottom up: the ground (roli's private helpers), ops and kernels, models and data, attacks,
features, the run's specs/options/directory, training, the command-line programs. Imports inside functions
count too (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import roli

ROOT = Path(roli.__file__).resolve().parent
GROUND = {
    "roli._amp",
    "roli._cli",
    "roli._compat",
    "roli._dist",
    "roli._env",
    "roli._ext",
    "roli._io",
    "roli.schedule",
    "roli.seeds",
}
FLOORS = [  # (floor, module prefixes)
    (0, GROUND),
    (1, {"roli.ops", "roli.kernels"}),
    (2, {"roli.models", "roli.data"}),
    (3, {"roli.attacks"}),
    (4, {"roli.features"}),
    (5, {"roli.specs", "roli.config", "roli.rundir"}),  # what a run builds from, its options, its directory
    (6, {"roli.training"}),
    (7, {"roli.train", "roli.evaluate", "roli.info", "roli.zoo", "roli.report", "roli.configs", "roli.grid"}),
    (8, {"roli.cli", "roli.__main__"}),  # the console command over the programs
]


def floor_of(module: str) -> int:
    for level, prefixes in FLOORS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    raise AssertionError(f"{module} has no floor in tests/test_imports.py: place it")


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The roli modules `name` imports (resolved to modules; `from pkg import submodule` counts as the
    submodule, `from pkg import attribute` as the package)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "roli"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            if base.split(".")[0] != "roli":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in known else base)
    out.discard(name)
    return {m for m in out if m != "roli"}  # the top-level package runs first in any case


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_every_module_has_a_floor_and_imports(graph):
    for name in graph:
        if name != "roli":
            floor_of(name)
    for info in pkgutil.walk_packages(roli.__path__, "roli."):
        if info.name.startswith("roli.kernels"):
            pytest.importorskip("triton")
        importlib.import_module(info.name)  # every subpackage and module imports on its own


def test_no_import_circle(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                circle = path[path.index(dep) :] + [dep]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_every_import_goes_down_or_sideways(graph):
    bad = []
    for name, deps in graph.items():
        if name == "roli":
            continue
        for dep in deps:
            if dep in graph and floor_of(dep) > floor_of(name):
                bad.append(f"{name} (floor {floor_of(name)}) imports {dep} (floor {floor_of(dep)})")
    assert not bad, "\n".join(sorted(bad))


def test_the_checker_finds_what_it_looks_for(tmp_path):
    # The checks above can fail: an upward import and a circle written into a throwaway graph are found.
    g = {"roli.ops.x": {"roli.training.y"}, "roli.training.y": {"roli.ops.x"}}
    with pytest.raises(AssertionError, match="import circle"):
        test_no_import_circle(g)
    with pytest.raises(AssertionError, match="imports roli.training.y"):
        test_every_import_goes_down_or_sideways(g)


def test_no_private_module_is_imported_from_another_package(graph):
    """roli.<pkg>._<name> is for roli.<pkg>'s own modules; other packages use what roli.<pkg> exports. (The
    ground floor, roli._*, belongs to the whole package.)"""
    crossing = []
    for name, deps in graph.items():
        for dep in deps:
            parts = dep.split(".")
            private = [i for i, p in enumerate(parts) if p.startswith("_") and i > 1]
            if private and not (name + ".").startswith(".".join(parts[: private[0]]) + "."):
                crossing.append(f"{name} -> {dep}")
    assert not crossing, crossing


def test_evaluate_and_report_import_nothing_of_the_trainer(graph):
    """roli evaluate and roli report read runs through the specs, the options and the run directory (floor 5),
    not through the trainer's package: a change inside roli.training cannot change an evaluation."""
    for program in ("roli.evaluate", "roli.report"):
        assert graph[program], program  # the graph holds its imports
        assert not [m for m in graph[program] if m.startswith("roli.training")], (program, graph[program])
