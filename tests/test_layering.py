"""vlmlabel's floors, read from the source with ``ast``: each lower floor imports only from itself and the floors
below it, never lazily from vlmlabel, and no vlmlabel modules import one another in a cycle.

Floors are named by package prefix, so modules moved or added inside one (``sources/hdf5/``, a ``cache/``
package) are held to it without editing this file. Floors not in ``ALLOWED`` (``run``, the engine, the cache,
the CLI) may import any floor; only cycles are refused there.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import vlmlabel

PACKAGE = Path(vlmlabel.__file__).parent
ROOT = "vlmlabel"

# floor -> the floors it may import (besides itself). The arrows only point down: files <- sources <- destinations.
ALLOWED: dict[str, set[str]] = {
    "vlmlabel.errors": set(),
    "vlmlabel.metadata": {"vlmlabel.errors"},
    "vlmlabel.files": {"vlmlabel.errors", "vlmlabel.metadata"},
    "vlmlabel.sources": {"vlmlabel.files", "vlmlabel.errors", "vlmlabel.metadata"},
    "vlmlabel.destinations": {"vlmlabel.sources", "vlmlabel.files", "vlmlabel.errors", "vlmlabel.metadata"},
}


@dataclass(frozen=True)
class Import:
    """One import of a vlmlabel module: where it is written, and whether it runs when its module is imported."""

    module: str
    target: str
    path: str  # from the folder holding the package, e.g. vlmlabel/sources/base.py
    line: int
    at_import: bool  # at module level (class bodies included), outside ``if TYPE_CHECKING:``

    def __str__(self) -> str:
        return f"{self.path}:{self.line} imports {self.target}"


def _modules(package: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, at_import: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import under ``node``, and whether it runs when the module is imported."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, at_import
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(child, False)
        elif isinstance(child, ast.If) and _is_type_checking(child):
            for statement in child.body:
                yield from _walk(ast.Module(body=[statement], type_ignores=[]), False)
            for statement in child.orelse:
                yield from _walk(ast.Module(body=[statement], type_ignores=[]), at_import)
        else:
            yield from _walk(child, at_import)


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> list[str]:
    """The vlmlabel modules ``node`` imports: ``from package import name`` is the submodule when there is one."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == ROOT]
    base = node.module or ""
    if node.level:  # relative: from the module's package, up ``level - 1`` more
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    if base.split(".")[0] != ROOT:
        return []
    return list(dict.fromkeys(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names))


def imports(package: Path = PACKAGE) -> list[Import]:
    """Every import of one vlmlabel module by another in ``package``'s source."""
    known = _modules(package)
    found = []
    for module, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node, at_import in _walk(tree, True):
            shown = path.relative_to(package.parent).as_posix()
            found.extend(
                Import(module, target, shown, node.lineno, at_import) for target in _targets(module, path, node, known)
            )
    return found


def importers_of(library: str, package: Path = PACKAGE) -> dict[str, list[int]]:
    """The vlmlabel modules that import ``library`` (a third-party top-level name), anywhere in their source,
    lazily or not, with the lines."""
    found: dict[str, list[int]] = {}
    for module, path in _modules(package).items():
        for node, _ in _walk(ast.parse(path.read_text(encoding="utf-8"), str(path)), True):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if not getattr(node, "level", 0) and any(name.split(".")[0] == library for name in names):
                found.setdefault(module, []).append(node.lineno)
    return found


def eager_imports_of(module: str, found: list[Import]) -> list[str]:
    """Imports of ``module`` that run when their own module is imported (anything but a lazy import)."""
    return [str(each) for each in found if each.target == module and each.at_import]


def floor_of(module: str) -> str | None:
    """The floor in ``ALLOWED`` holding ``module`` (the longest prefix that names it), else None."""
    named = [floor for floor in ALLOWED if module == floor or module.startswith(floor + ".")]
    return max(named, key=len) if named else None


def back_arrows(found: list[Import]) -> list[str]:
    """Imports by a lower floor of anything but itself and the floors ``ALLOWED`` below it."""
    wrong = []
    for each in found:
        floor = floor_of(each.module)
        if floor is None:
            continue
        if floor_of(each.target) not in ALLOWED[floor] | {floor}:
            below = ", ".join(sorted(f.removeprefix("vlmlabel.") for f in ALLOWED[floor])) or "nothing of vlmlabel"
            wrong.append(f"{each} ({floor.removeprefix('vlmlabel.')} may import only {below})")
    return wrong


def lazy_in_floors(found: list[Import]) -> list[str]:
    """vlmlabel imports inside functions (or only for type checking) in a lower floor: one that is allowed can be
    at the top, and one that is not only hides a back arrow."""
    return [f"{each} inside a function" for each in found if floor_of(each.module) and not each.at_import]


def cycles(found: list[Import]) -> list[list[Import]]:
    """One cycle through each group of modules that import one another when imported (Tarjan's strongly
    connected components over the imports that run at import time)."""
    edges: dict[str, list[Import]] = {}
    for each in found:
        if each.at_import and each.target != each.module:
            edges.setdefault(each.module, []).append(each)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for edge in edges.get(module, []):
            if edge.target not in index:
                visit(edge.target)
                low[module] = min(low[module], low[edge.target])
            elif edge.target in stack:
                low[module] = min(low[module], index[edge.target])
        if low[module] == index[module]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(group)

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return [_one_cycle(sorted(group)[0], group, edges) for group in groups]


def _one_cycle(start: str, group: set[str], edges: dict[str, list[Import]]) -> list[Import]:
    """A shortest path of imports from ``start`` back to itself, inside ``group``."""
    paths: dict[str, list[Import]] = {start: []}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for edge in edges.get(module, []):
                if edge.target == start:
                    return [*paths[module], edge]
                if edge.target in group and edge.target not in paths:
                    paths[edge.target] = [*paths[module], edge]
                    following.append(edge.target)
        frontier = following
    raise AssertionError(f"{start} is in a cycle that cannot be walked")


def test_the_floors_import_only_downward():
    wrong = back_arrows(imports())
    assert not wrong, "imports against the floors:\n" + "\n".join(wrong)


def test_no_lower_floor_imports_vlmlabel_lazily():
    lazy = lazy_in_floors(imports())
    assert not lazy, "lazy vlmlabel imports in a lower floor:\n" + "\n".join(lazy)


def test_no_vlmlabel_modules_import_one_another_in_a_cycle():
    found = cycles(imports())
    shown = ["\n".join(f"  {edge}" for edge in cycle) for cycle in found]
    assert not found, "import cycles:\n" + "\n\n".join(shown)


# transformers is the optional extra vlmlabel[vlm]: one module imports it, and no module imports that one at
# import time (the scorer registry loads it when --scorer vlm asks), so the CLI starts without transformers.
OPTIONAL = {"transformers": "vlmlabel.judge"}


def test_only_the_judge_imports_transformers():
    for library, door in OPTIONAL.items():
        assert sorted(importers_of(library)) == [door], f"{library} is imported outside {door}"


def test_the_judge_is_imported_only_lazily():
    eager = [line for door in OPTIONAL.values() for line in eager_imports_of(door, imports())]
    assert not eager, "the optional extra's module imported at import time:\n" + "\n".join(eager)


def test_the_optional_import_checks_see_a_second_importer_and_an_eager_import(tmp_path):
    package = tmp_path / "vlmlabel"
    for name, text in {
        "__init__.py": "",
        "judge.py": "try:\n    from transformers import AutoProcessor\nexcept ImportError:\n    pass\n",
        "run/__init__.py": "",
        "run/score.py": "from vlmlabel import judge\n\ndef f():\n    import transformers.models\n",
        "run/lazy.py": "def f():\n    from vlmlabel.judge import Judge\n",
    }.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    assert importers_of("transformers", package) == {"vlmlabel.judge": [2], "vlmlabel.run.score": [4]}
    assert eager_imports_of("vlmlabel.judge", imports(package)) == ["vlmlabel/run/score.py:1 imports vlmlabel.judge"]


def test_the_checks_see_a_back_arrow_a_lazy_import_and_a_cycle(tmp_path):
    """The checks above on a made-up package with one of each fault, so that a silent pass means something."""
    package = tmp_path / "vlmlabel"
    for name, text in {
        "__init__.py": "",
        "errors.py": "",
        "files/__init__.py": "",
        "files/atomic.py": "from vlmlabel.errors import x\n",
        "sources/__init__.py": "from vlmlabel.sources import base\n",
        "sources/base.py": "def f():\n    from vlmlabel.destinations import journal\n",
        "destinations/__init__.py": "",
        "destinations/journal.py": "from . import hdf5\n",
        "destinations/hdf5.py": "from vlmlabel.destinations.journal import y\nfrom vlmlabel.files import atomic\n",
    }.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    found = imports(package)
    assert [s.split(" (")[0] for s in back_arrows(found)] == [
        "vlmlabel/sources/base.py:2 imports vlmlabel.destinations.journal"
    ]
    assert len(lazy_in_floors(found)) == 1
    (cycle,) = cycles(found)
    assert {(edge.module, edge.target) for edge in cycle} == {
        ("vlmlabel.destinations.hdf5", "vlmlabel.destinations.journal"),
        ("vlmlabel.destinations.journal", "vlmlabel.destinations.hdf5"),
    }
