"""The program nginx runs (supervisor/lua/bluegreen.lua) is linted like the Python: luacheck,
with the ngx_lua standard (.luacheckrc). What it does is pinned end to end by the runtime
switch's tests (test_runtime, test_split, test_preview, the failure matrix)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from helpers import ROOT
from supervisor.nginx import LUA_CONTROLS, LUA_DIR


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
