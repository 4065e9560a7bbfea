"""The model and training packages import as DAGs: no module of `openflamingo.model` or `openflamingo.train` imports
itself back through the others, and the model (`flamingo.py`) knows nothing about building, loading or converting it.

Every import counts, at module level or inside a function, relative or absolute: a lazy import only postpones a
cycle to the call that runs it. Importing `pkg.sub` runs `pkg/__init__.py` first, so it is an edge to `pkg` too
(unless `pkg` contains the importer: Python imports that package before any of its modules anyway).

The tests keep a layout too: test modules share builders through tests/helpers/ (and tiny.py, serving.py,
idefics_reference.py), never by importing one another."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src"
TESTS = Path(__file__).parent
PACKAGE = "openflamingo.model"


def module_name(path: Path, package: str) -> str:
    parts = path.relative_to(SRC.joinpath(*package.split("."))).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((package, *parts))


def package_modules(package: str) -> dict[str, Path]:
    directory = SRC.joinpath(*package.split("."))
    return {module_name(path, package): path for path in sorted(directory.rglob("*.py"))}


def imported_names(source: str, name: str, is_package: bool = False) -> set[str]:
    """Fully qualified names of what module `name` imports (modules, or modules' attributes), at any depth."""
    package = name if is_package else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(
                    [*parts[: len(parts) - (node.level - 1)], *([node.module] if node.module else [])]
                )
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def import_graph(package: str = PACKAGE) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports (parent packages included, see the docstring)."""
    modules = package_modules(package)
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target in imported_names(path.read_text(), name, path.name == "__init__.py"):
            while target:
                if target in modules and target != name and not name.startswith(f"{target}."):
                    edges.add(target)
                target = target.rpartition(".")[0]
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph[node]):
            if cycle := visit(target):
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if cycle := visit(node):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module `start` imports, directly or through others, with one import path to it."""
    paths = {start: [start]}
    stack = [start]
    while stack:
        node = stack.pop()
        for target in graph[node]:
            if target not in paths:
                paths[target] = [*paths[node], target]
                stack.append(target)
    return paths


def test_the_layout_parser_sees_imports_at_every_level():
    """Guards the checks below against passing on a graph that lost its edges."""
    source = (
        "from .config import FlamingoConfig\n"
        "def save(model):\n"
        "    from . import checkpoint\n"
        "    import openflamingo.model.files as files\n"
        "    from ..backbones import resolve_language_model\n"
        "    from .convert.mpt import convert_mosaic_gpt\n"
    )
    names = imported_names(source, f"{PACKAGE}.example")
    assert {
        f"{PACKAGE}.config",
        f"{PACKAGE}.checkpoint",
        f"{PACKAGE}.files",
        "openflamingo.backbones",
        f"{PACKAGE}.convert.mpt",
    } <= names
    assert f"{PACKAGE}.files" in imported_names(
        "from ..files import atomic_directory", f"{PACKAGE}.convert.mpt"
    )
    in_package = imported_names("from .mpt import x", f"{PACKAGE}.convert", is_package=True)
    assert f"{PACKAGE}.convert.mpt" in in_package  # an __init__'s "." is its own package
    graph = import_graph()
    assert f"{PACKAGE}.build" in graph[f"{PACKAGE}.checkpoint"]
    assert {f"{PACKAGE}.convert.mpt", f"{PACKAGE}.convert"} <= graph[f"{PACKAGE}.build"]  # and its __init__
    assert f"{PACKAGE}.files" in graph[f"{PACKAGE}.convert.mpt"]
    assert f"{PACKAGE}.build" in graph[f"{PACKAGE}.convert.openflamingo"]


@pytest.mark.parametrize("package", [PACKAGE, "openflamingo.train"])
def test_the_package_has_no_import_cycle(package):
    cycle = find_cycle(import_graph(package))
    if cycle:
        print("import cycle: " + " -> ".join(cycle))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    "importer, forbidden",
    [
        (
            "flamingo",
            ("checkpoint", "build", "convert"),
        ),  # the model knows nothing of how it is built or saved
        ("build", ("checkpoint",)),  # building a fresh model is not loading one
    ],
)
def test_lower_layers_do_not_import_higher_ones(importer, forbidden):
    paths = reachable(import_graph(), f"{PACKAGE}.{importer}")
    bad = {
        target: path
        for target, path in paths.items()
        for name in forbidden
        if target == f"{PACKAGE}.{name}" or target.startswith(f"{PACKAGE}.{name}.")
    }
    assert not bad, "; ".join(" -> ".join(path) for path in bad.values())


def imported_test_modules(source: str, name: str) -> set[str]:
    """The test modules (`test_*`) that module `name` of tests/ imports, at module level or inside a function."""
    return {
        imported.partition(".")[0]
        for imported in imported_names(source, name)
        if imported.startswith("test_") and imported.partition(".")[0] != name
    }


def test_no_test_module_imports_another():
    """A test module is there for its tests: what several of them build the same way lives in tests/helpers/, so
    that running, moving or changing one test module never depends on another (nor re-activates its fixtures)."""
    lazy = "def test_x():\n    from test_model import batch\n    import test_train as t\n"
    assert imported_test_modules(lazy, "test_a") == {"test_model", "test_train"}  # it sees lazy imports
    assert imported_test_modules("from helpers.model import batch\nimport test_a\n", "test_a") == set()
    offenders = {
        path.relative_to(TESTS).as_posix(): sorted(found)
        for path in sorted(TESTS.rglob("*.py"))
        if (found := imported_test_modules(path.read_text(), path.stem))
    }
    assert not offenders, (
        "test modules importing test modules (move what they share to tests/helpers/): "
        + "; ".join(f"{path} imports {', '.join(names)}" for path, names in offenders.items())
    )
