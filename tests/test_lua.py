"""The program nginx runs (supervisor/lua/bluegreen.lua) is linted like the Python: luacheck,
with the ngx_lua standard (.luacheckrc). What it does is pinned end to end by the runtime
switch's tests (test_runtime, test_split, test_preview, the failure matrix)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from helpers import ROOT
from supervisor.proxy.render import LUA_CONTROLS, LUA_DIR


def test_the_lua_is_luacheck_clean() -> None:
    luacheck = shutil.which("luacheck")
    if luacheck is None:
        pytest.fail("luacheck is not installed: run scripts/bootstrap --test (Debian package lua-check)")
    r = subprocess.run([luacheck, "--formatter", "plain", "--codes", str(LUA_DIR)], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_control_locations_are_the_ones_the_lua_answers() -> None:
    text = (LUA_DIR / "bluegreen.lua").read_text()
    assert set(re.findall(r"^function control\.(\w+)\(", text, re.M)) == set(LUA_CONTROLS)


def test_a_changed_lua_program_makes_the_rendered_part_stale(tmp_path, monkeypatch) -> None:
    """An upgraded bluegreen's daemon finds its nginx part changed, so it reloads nginx, which
    loads the new program (nginx keeps the old one in memory until then)."""
    from pathlib import Path

    from supervisor.proxy import render as nginx

    before = nginx.render_runtime("app", Path("/r"), Path("/c"))
    (tmp_path / "bluegreen.lua").write_text((LUA_DIR / "bluegreen.lua").read_text() + "\n-- the next version\n")
    monkeypatch.setattr(nginx, "LUA_DIR", tmp_path)
    after = nginx.render_runtime("app", Path("/r"), Path("/c"))
    assert before != after and nginx.lua_digest() in after
