"""No function in ``fhe_quant/`` is longer than 60 lines of code (issue 13).

A line of code is a line of a function's body that is not blank, not only a comment and
not part of its docstring; nested functions count towards their own length and towards
the function that holds them. Functions over the limit today are listed in
:data:`KNOWN_LONG` with the change that shortens them; the list may only shrink (an entry
that is no longer too long fails too, so that it is removed).
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterator

import fhe_quant

LIMIT = 60

#: (module path relative to the package, qualified function name) -> why it is still long.
KNOWN_LONG: dict[tuple[str, str], str] = {}

ROOT = pathlib.Path(fhe_quant.__file__).parent


def _docstring_lines(node: ast.AST) -> set[int]:
    body = getattr(node, "body", [])
    first = body[0] if body else None
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        return set(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return set()


def code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef, source: list[str]) -> int:
    """Lines of code in ``node``'s body: no blank lines, comments or docstring.

    >>> tree = ast.parse('def f():\\n    "doc"\\n\\n    # why\\n    return 1\\n')
    >>> code_lines(tree.body[0], ['def f():', '    "doc"', '', '    # why', '    return 1'])
    1
    """
    skip = _docstring_lines(node)
    first = node.body[0].lineno
    last = node.end_lineno or first
    count = 0
    for number in range(first, last + 1):
        text = source[number - 1].strip()
        if number in skip or not text or text.startswith("#"):
            continue
        count += 1
    return count


def functions(root: pathlib.Path = ROOT) -> Iterator[tuple[str, str, int]]:
    """Every function and method under ``root``: (path, qualified name, lines of code)."""
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        source = text.splitlines()
        relative = path.relative_to(root).as_posix()
        yield from _walk(ast.parse(text), source, relative, "")


def _walk(
    node: ast.AST, source: list[str], path: str, prefix: str
) -> Iterator[tuple[str, str, int]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{child.name}"
            yield path, name, code_lines(child, source)
            yield from _walk(child, source, path, f"{name}.")
        elif isinstance(child, ast.ClassDef):
            yield from _walk(child, source, path, f"{prefix}{child.name}.")
        else:
            yield from _walk(child, source, path, prefix)


def test_no_function_is_longer_than_the_limit() -> None:
    too_long = {(path, name): lines for path, name, lines in functions() if lines > LIMIT}
    new = {key: lines for key, lines in too_long.items() if key not in KNOWN_LONG}
    assert not new, f"functions over {LIMIT} lines of code (split them): {new}"


def test_known_long_functions_are_still_long() -> None:
    lengths = {(path, name): lines for path, name, lines in functions()}
    fixed = [key for key in KNOWN_LONG if lengths.get(key, 0) <= LIMIT]
    assert not fixed, f"shortened or gone, remove from KNOWN_LONG: {fixed}"


def test_the_count_skips_docstrings_comments_and_blank_lines(tmp_path: pathlib.Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT + 1))
    (tmp_path / "m.py").write_text(
        f'def long():\n    """Doc.\n\n    More.\n    """\n    # note\n\n{body}\n'
        f"def short():\n    # a\n    return 1\n"
    )
    found = {name: lines for _, name, lines in functions(tmp_path)}
    assert found == {"long": LIMIT + 1, "short": 1}
