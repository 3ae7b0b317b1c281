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


DAEMON_ONLY = ("asyncio", "httpx", "psutil", "aiofiles", "supervisor.config", "supervisor.app", "supervisor.daemon",
               "supervisor.nginx", "supervisor.slots", "supervisor.logs")


@pytest.mark.parametrize("argv", [["--version"], ["status", "-c", "CONFIG"], ["swap", "-c", "CONFIG", "/nonexistent"],
                                  ["history", "-c", "CONFIG"], ["--help"]])
def test_the_cli_loads_only_what_a_client_needs(argv: list[str], tmp_path: Path) -> None:
    """A verb reads the socket path from the config and speaks the wire format: it never imports the
    daemon (what made `bluegreen status` 8-10 times a bare Python start)."""
    import subprocess
    import sys

    config = tmp_path / "app.toml"
    config.write_text('[daemon]\nstate_dir = "run"\n[app]\ncommand = ["x"]\n')
    probe = (f"import sys\nsys.argv = ['bluegreen'] + {[a.replace('CONFIG', str(config)) for a in argv]!r}\n"
             "from supervisor.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
             f"print('LOADED', sorted(m for m in sys.modules if m.startswith({DAEMON_ONLY!r})))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path).stdout
    loaded = out.rsplit("LOADED ", 1)[-1].strip()
    assert loaded == "[]", f"{argv}: {loaded}"
