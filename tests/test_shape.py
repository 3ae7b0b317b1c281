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
    text = "\n".join(p.read_text() for p in [PACKAGE.parent / "README.md", *(PACKAGE.parent / "docs").glob("*.md")])
    missing = sorted(c for c in codes if c not in tree or f"`{c}`" not in text)
    assert not missing, f"codes raised but not listed in errors.py's tree or the manual (README, docs/): {missing}"


DAEMON_ONLY = ("asyncio", "httpx", "psutil", "aiofiles", "prometheus_client", "supervisor.config", "supervisor.release",
               "supervisor.daemon", "supervisor.proxy", "supervisor.processes")


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


# The layers, lowest first: a module imports only from its own layer or a lower one (the top-level
# modules are the base: errors, the wire format, files, state, the client).
LAYERS = {"": 0, "config": 1, "processes": 2, "proxy": 3, "release": 4, "commands": 5, "daemon": 6, "cli": 7,
          "__main__": 7}


def imported(f: Path) -> set[str]:
    """The package modules `f` imports when it runs (function-local imports included; those under
    TYPE_CHECKING, for annotations only, left out)."""
    mod = ".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    tree = ast.parse(f.read_text())
    typing_only = {id(m) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                   for m in ast.walk(n)}
    out = set()
    for n in ast.walk(tree):
        if id(n) in typing_only or not isinstance(n, ast.ImportFrom):
            continue
        if n.level:
            base = mod.split(".")[:len(mod.split(".")) - n.level + (f.name == "__init__.py")]
            target = ".".join(base + ([n.module] if n.module else []))
        elif (n.module or "").startswith("supervisor"):
            target = n.module or ""
        else:
            continue
        for alias in n.names:
            sub = f"{target}.{alias.name}"
            is_module = (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() or \
                (PACKAGE.parent / sub.replace(".", "/")).is_dir()
            out.add(sub if is_module else target)
    return out - {mod, "supervisor"}


def layer(module: str) -> str:
    part = module.split(".")[1] if "." in module else ""
    return part if part in LAYERS and ((PACKAGE / part).is_dir() or part in ("cli", "__main__")) else ""


GRAPH = {".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): imported(f)
         for f in FILES}


def test_imports_only_point_down_the_layers() -> None:
    up = [f"{m} -> {t}" for m, targets in sorted(GRAPH.items()) for t in sorted(targets)
          if t in GRAPH and LAYERS[layer(t)] > LAYERS[layer(m)]]
    assert not up, up


def test_no_module_imports_itself_back() -> None:
    """No import cycle, function-local imports included."""
    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [t for t in GRAPH[start] if t in GRAPH]
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo += [t for t in GRAPH[m] if t in GRAPH]
        return False

    cycles = sorted(m for m in GRAPH if reaches(m, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_the_app_changes_only_through_its_own_methods() -> None:
    """What the app is doing (active, standby, retiring, status...) is written in release/app.py
    only: the executor, the monitor, takeover and the daemon call its methods."""
    writes = []
    for f in FILES:
        if f.name == "app.py" and f.parent.name == "release":
            continue
        for n in ast.walk(ast.parse(f.read_text())):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(
                n, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                for e in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if isinstance(e, ast.Attribute) and ast.unparse(e.value) in ("app", "self.app", "daemon.app"):
                        writes.append(f"{f.relative_to(PACKAGE.parent)}:{n.lineno} {ast.unparse(e)}")
    assert not writes, writes
