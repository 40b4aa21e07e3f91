"""The import direction of fhe_quant's stages (docs/ARCHITECTURE.md).

Every module belongs to a stage; a stage imports only earlier stages (and itself), and no
two modules import each other, directly or through others. Imports are read with ``ast``
from the source, module-level and function-level alike (a function-level import still
ties the two modules together); imports under ``if TYPE_CHECKING:`` are type hints only
and do not count.

Edges that break the rules today and need a larger refactoring are listed in
:data:`ALLOWED`, each with its reason and the part of issue 13 that removes it. A new
violation fails; so does an allowed edge that no longer exists (remove it from the list).
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import pytest

import fhe_quant

#: The stages in order, each with the modules it holds (a name ending in ``.*`` holds a
#: package and everything below it). A stage may import the stages before it.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("errors", ("fhe_quant", "fhe_quant.errors")),
    ("ir", ("fhe_quant.ir", "fhe_quant.specs")),
    ("passes", ("fhe_quant.passes",)),
    ("quant", ("fhe_quant.quant.*",)),
    (
        "lower",
        ("fhe_quant.lower", "fhe_quant.verify", "fhe_quant.lower_tree", "fhe_quant.lower_knn"),
    ),
    ("fhe", ("fhe_quant.fhe", "fhe_quant.process")),
    (
        "model",
        (
            "fhe_quant.model",
            "fhe_quant.report",
            "fhe_quant.training",
            "fhe_quant.cost",
            "fhe_quant.qat_module",
            "fhe_quant.program_modules",
        ),
    ),
    (
        "public API",
        (
            "fhe_quant.torch",
            "fhe_quant.sklearn",
            "fhe_quant.qat",
            "fhe_quant.qat_prepare",
            "fhe_quant.qat_estimators",
            "fhe_quant.onnx",
            "fhe_quant.search",
        ),
    ),
    ("deploy", ("fhe_quant.deploy.artifact", "fhe_quant.signing")),
    (
        "serving",
        (
            "fhe_quant.deploy",  # the package's face: its FHEModelServer.run_batch uses batch
            "fhe_quant.http",
            "fhe_quant.serve",
            "fhe_quant.cli",
            "fhe_quant.batch",
            "fhe_quant.keystore",
            "fhe_quant.predictions",
            "fhe_quant.service_client",
        ),
    ),
)

#: Stages outside the chain: what each may import. Frontends read models and emit graphs
#: or specs (``fhe_quant.specs``, at the ir stage); the public API and everything after
#: it may import them.
SIDE_STAGES: Mapping[str, tuple[tuple[str, ...], str]] = {
    "frontends": (("errors", "ir"), "public API"),
}
SIDE_MODULES = {"frontends": ("fhe_quant.frontends.*",)}

#: Edges (importer, imported) that break the rules today, with why and what removes them.
ALLOWED: Mapping[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    """One import of a module by another, read from the source."""

    importer: str
    imported: str
    line: int
    in_function: bool
    private: tuple[str, ...] = ()

    def __str__(self) -> str:
        where = "function-level" if self.in_function else "module-level"
        return f"{self.importer} imports {self.imported} (line {self.line}, {where})"


def _module_name(root: pathlib.Path, path: pathlib.Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield other, in_function
                yield from _walk(other, in_function)
            continue
        nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
        yield child, in_function
        yield from _walk(child, nested)


def _targets(
    node: ast.AST, module: str, is_package: bool, known: set[str]
) -> list[tuple[str, str | None]]:
    """``(module, name)`` for each name the import reads (``None``: the module itself)."""
    if isinstance(node, ast.Import):
        return [(alias.name, None) for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    # `from package import submodule` imports the submodule; other names, the package.
    return [
        (f"{base}.{a.name}", None) if f"{base}.{a.name}" in known else (base, a.name)
        for a in node.names
    ]


def read_imports(root: pathlib.Path) -> list[Import]:
    """Every import of a module of the package at ``root`` by another one of them."""
    files = {_module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    found = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_package = path.name == "__init__.py"
        for node, in_function in _walk(tree):
            for target, name in _targets(node, module, is_package, known):
                # NOTE: `import pkg.sub.mod` names the deepest module that exists.
                while target and target not in known:
                    target = target.rpartition(".")[0]
                private = (name,) if name and name.startswith("_") and name[:2] != "__" else ()
                if target and target != module:
                    found.append(Import(module, target, node.lineno, in_function, private))
    return found


def stage_of(module: str, stages=STAGES, side_modules=SIDE_MODULES) -> str | None:
    """The stage holding ``module`` (``None``: it has none)."""
    groups = [(name, patterns) for name, patterns in stages] + list(side_modules.items())
    for name, patterns in groups:
        for pattern in patterns:
            if module == pattern or (
                pattern.endswith(".*")
                and (module == pattern[:-2] or module.startswith(pattern[:-1]))
            ):
                return name
    return None


def may_import(importer: str, imported: str, stages=STAGES, side=SIDE_STAGES) -> bool:
    """Whether stage ``importer`` may import stage ``imported``."""
    if importer == imported:
        return True
    order = [name for name, _ in stages]
    if importer in side:
        return imported in side[importer][0]
    if imported in side:
        return order.index(importer) >= order.index(side[imported][1])
    return order.index(imported) < order.index(importer)


def cycles(imports: list[Import]) -> list[list[str]]:
    """The sets of modules that import each other (strongly connected components of more
    than one module), each sorted."""
    graph: dict[str, set[str]] = {}
    for edge in imports:
        graph.setdefault(edge.importer, set()).add(edge.imported)
        graph.setdefault(edge.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def check(
    root: pathlib.Path,
    allowed: Mapping[tuple[str, str], str] = ALLOWED,
    stages=STAGES,
    side=SIDE_STAGES,
    side_modules=SIDE_MODULES,
) -> list[str]:
    """Every problem of the package at ``root``: modules without a stage, imports of a
    later stage or of another module's private names, modules importing each other, and
    allowed edges that no longer exist."""
    imports = read_imports(root)
    allowed_edges = set(allowed)
    problems = []
    modules = {edge.importer for edge in imports} | {edge.imported for edge in imports}
    modules |= {_module_name(root, p) for p in root.rglob("*.py")}
    for module in sorted(modules):
        if stage_of(module, stages, side_modules) is None:
            problems.append(f"{module} has no stage: add it to STAGES (docs/ARCHITECTURE.md)")
    edges = {(e.importer, e.imported) for e in imports}
    for edge in imports:
        a = stage_of(edge.importer, stages, side_modules)
        b = stage_of(edge.imported, stages, side_modules)
        if edge.private and (edge.importer, edge.imported) not in allowed_edges:
            problems.append(f"{edge}: reads the private name {edge.private[0]}")
        if a is None or b is None or (edge.importer, edge.imported) in allowed_edges:
            continue
        if not may_import(a, b, stages, side):
            problems.append(f"{edge}: stage {a!r} may not import stage {b!r}")
    for component in cycles([e for e in imports if (e.importer, e.imported) not in allowed]):
        problems.append(f"modules import each other: {' <-> '.join(component)}")
    for stale in sorted(allowed_edges - edges):
        problems.append(f"allowed edge {stale[0]} -> {stale[1]} no longer exists: remove it")
    return problems


def test_fhe_quant_imports_follow_the_stages() -> None:
    root = pathlib.Path(fhe_quant.__file__).parent
    problems = check(root)
    assert not problems, "\n".join(problems)


def test_every_allowed_edge_says_why() -> None:
    for edge, reason in ALLOWED.items():
        assert "part" in reason, f"{edge}: name the issue 13 part that removes it"


# --------------------------------------------------------------------------- the checker


def _package(tmp_path: pathlib.Path, files: Mapping[str, str]) -> pathlib.Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


_TOY_STAGES = (("base", ("pkg", "pkg.base")), ("core", ("pkg.core.*",)), ("top", ("pkg.top",)))
_TOY_SIDE = {"front": (("base",), "top")}
_TOY_SIDE_MODULES = {"front": ("pkg.front",)}


def _toy_check(root: pathlib.Path, allowed: Mapping[tuple[str, str], str]) -> list[str]:
    return check(root, allowed, _TOY_STAGES, _TOY_SIDE, _TOY_SIDE_MODULES)


def test_checker_accepts_imports_of_earlier_stages(tmp_path: pathlib.Path) -> None:
    root = _package(
        tmp_path,
        {
            "base.py": "",
            "core/__init__.py": "from pkg import base\n",
            "core/a.py": "from . import b\nfrom ..base import x\n",
            "core/b.py": "import pkg.base\n",
            "front.py": "from pkg.base import y\n",
            "top.py": "from pkg.core.a import z\nimport pkg.front\n",
        },
    )
    assert _toy_check(root, {}) == []


def test_checker_flags_a_later_stage_even_in_a_function(tmp_path: pathlib.Path) -> None:
    root = _package(
        tmp_path,
        {
            "base.py": "def f():\n    from pkg.core import a\n",
            "core/__init__.py": "",
            "core/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from pkg import top\n",
            "front.py": "from pkg.core import a\n",
            "top.py": "",
        },
    )
    problems = _toy_check(root, {})
    assert problems == [
        "pkg.base imports pkg.core.a (line 2, function-level): stage 'base' may not import "
        "stage 'core'",
        "pkg.front imports pkg.core.a (line 1, module-level): stage 'front' may not import "
        "stage 'core'",
    ]
    allowed = {("pkg.base", "pkg.core.a"): "test", ("pkg.front", "pkg.core.a"): "test"}
    assert _toy_check(root, allowed) == []


def test_checker_flags_modules_importing_each_other(tmp_path: pathlib.Path) -> None:
    root = _package(
        tmp_path,
        {
            "base.py": "",
            "core/__init__.py": "",
            "core/a.py": "from pkg.core import b\n",
            "core/b.py": "def f():\n    import pkg.core.c\n",
            "core/c.py": "from pkg.core.a import g\n",
            "top.py": "",
            "front.py": "",
        },
    )
    assert _toy_check(root, {}) == [
        "modules import each other: pkg.core.a <-> pkg.core.b <-> pkg.core.c"
    ]
    assert _toy_check(root, {("pkg.core.c", "pkg.core.a"): "test"}) == []


def test_checker_flags_private_names_of_other_modules(tmp_path: pathlib.Path) -> None:
    root = _package(
        tmp_path,
        {"base.py": "_x = 1\n__all__ = []\n", "top.py": "from pkg.base import _x, __all__\n"},
    )
    assert _toy_check(root, {}) == [
        "pkg.top imports pkg.base (line 1, module-level): reads the private name _x"
    ]


def test_checker_flags_stale_allowances_and_unknown_modules(tmp_path: pathlib.Path) -> None:
    root = _package(tmp_path, {"base.py": "", "top.py": "", "extra.py": "import pkg.base\n"})
    assert _toy_check(root, {("pkg.top", "pkg.base"): "test"}) == [
        "pkg.extra has no stage: add it to STAGES (docs/ARCHITECTURE.md)",
        "allowed edge pkg.top -> pkg.base no longer exists: remove it",
    ]


@pytest.mark.parametrize(
    ("module", "stage"),
    [
        ("fhe_quant", "errors"),
        ("fhe_quant.quant.ptq", "quant"),
        ("fhe_quant.frontends.sklearn.tree", "frontends"),
        ("fhe_quant.cli", "serving"),
    ],
)
def test_stage_of(module: str, stage: str) -> None:
    assert stage_of(module) == stage
