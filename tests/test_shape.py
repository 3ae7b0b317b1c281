"""The package keeps the shape that makes it easy to extend: small classes and functions, and no
object reaching into another's private parts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "supervisor"
FILES = sorted(PACKAGE.rglob("*.py"))


def nodes(kind: type | tuple[type, ...]) -> list[tuple[str, ast.AST]]:
    out = []
    for f in FILES:
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, kind):
                out.append((f"{f.relative_to(PACKAGE.parent)}:{n.lineno} {getattr(n, 'name', '')}", n))
    return out


def length(n: ast.AST) -> int:
    return n.end_lineno - n.lineno + 1  # type: ignore[attr-defined, operator]


@pytest.mark.parametrize("limit, kind", [(250, ast.ClassDef), (60, (ast.FunctionDef, ast.AsyncFunctionDef))])
def test_no_class_or_function_is_too_long(limit: int, kind: type) -> None:
    long = [f"{where} ({length(n)} lines)" for where, n in nodes(kind) if length(n) > limit]
    assert not long, f"longer than {limit} lines: {long}"


def test_no_code_touches_another_objects_underscore_attributes() -> None:
    touched = [where for where, n in nodes(ast.Attribute)
               if n.attr.startswith("_") and not n.attr.startswith("__")  # type: ignore[attr-defined]
               and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))]  # type: ignore[attr-defined]
    assert not touched, touched


def test_every_error_code_raised_is_in_the_error_tree_and_the_readme() -> None:
    import re

    codes = set()
    for f in FILES:
        codes |= set(re.findall(r'code="([a-z_]+)"', f.read_text()))
    tree = (PACKAGE / "errors.py").read_text().split('"""')[1]
    readme = (PACKAGE.parent / "README.md").read_text()
    missing = sorted(c for c in codes if c not in tree or f"`{c}`" not in readme)
    assert not missing, f"codes raised but not listed in errors.py's tree or the README: {missing}"
