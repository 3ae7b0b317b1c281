"""Rendering: exactly one server line, and the managed config keeps every path in its prefix."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config import schema as config
from supervisor.proxy.render import parse_upstream_port, render_managed_conf, render_upstream


def test_upstream_has_exactly_one_server_line_and_parses_back() -> None:
    text = render_upstream("bluegreen_app", 8002)
    assert [ln.strip() for ln in text.splitlines() if ln.strip().startswith("server")] == ["server 127.0.0.1:8002;"]
    assert "down" not in text and "backup" not in text
    assert parse_upstream_port(text) == 8002
    assert parse_upstream_port("") is None


def test_managed_conf_keeps_every_path_in_the_prefix() -> None:
    cfg = config.parse('[app]\ncommand = ["x"]\nports = [1, 2]\nbuild = "b"\n[drain]\ntimeout = 7.5\n',
                       Path("/srv/app/bluegreen.toml"))
    prefix = Path("/srv/app/run/nginx")
    text = render_managed_conf(cfg, prefix, prefix / "upstream.conf")
    for directive in ("pid", "error_log", "access_log", "client_body_temp_path", "proxy_temp_path",
                      "fastcgi_temp_path", "uwsgi_temp_path", "scgi_temp_path"):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(directive + " "))
        assert f' "{prefix}/' in line, line  # quoted: a path with a space stays one argument
    assert "worker_shutdown_timeout 9s;" in text  # ceil(7.5) + 1: the daemon's deadline acts first
    assert "listen 127.0.0.1:8080;" in text and "proxy_pass http://$bluegreen_app_route;" in text  # the maps pick main or preview


def test_a_preview_is_its_own_upstream_chosen_by_header_then_cookie() -> None:
    from supervisor.config.schema import ReleaseConfig

    text = render_upstream("myapp", 8001, preview=8002, release=ReleaseConfig(preview_header="X-Canary",
                                                                              preview_cookie="canary"))
    assert parse_upstream_port(text) == 8001  # the main upstream stays first: what serves everyone
    assert "upstream myapp__preview {\n    server 127.0.0.1:8002;\n}" in text
    assert 'map $cookie_canary $myapp_route__by_cookie {\n    default myapp;\n    "1" myapp__preview;\n}' in text
    assert 'map $http_x_canary $myapp_route {\n    default $myapp_route__by_cookie;\n    "1" myapp__preview;\n}' in text
    off = render_upstream("myapp", 8001)
    assert "__preview" not in off.replace("__by_cookie", "") and '"1" myapp;' in off  # the variable always exists


def test_the_runtime_part_reads_the_configured_preview_and_rollout_cookies() -> None:
    from supervisor.config.schema import ReleaseConfig
    from supervisor.proxy.render import render_runtime

    from supervisor.config.schema import HoldConfig
    from supervisor.proxy.render import LUA_CONTROLS

    text = render_runtime("app", Path("/r"), Path("/c"), ReleaseConfig(preview_cookie="pv"), rollout_cookie="uid",
                          hold=HoldConfig(), hold_port=4321)
    # Every call into bluegreen.lua gets the app's settings: the preview cookie read, the rollout
    # cookie a new user's id goes back in. (The balancer, each control location, and the hold
    # server's access handler and balancer.)
    calls = 1 + len(LUA_CONTROLS) + 2
    assert text.count("preview_cookie = [==[cookie_pv]==]") == calls
    assert text.count("rollout_cookie = [==[uid]==]") == calls
    assert "listen 127.0.0.1:4321;" in text and "hold_port = 4321" in text


def test_the_templates_are_files_whose_every_field_is_filled_and_values_are_taken_as_they_are() -> None:
    """nginx's config lives in supervisor/proxy/templates/ (package data): a field left out or
    a field the template lost fails at rendering, and a value that looks like a field stays text."""
    from supervisor.proxy import render

    names = sorted(p.name for p in render.TEMPLATES.glob("*.conf"))
    source = Path(render.__file__).read_text()
    assert names and all(f'"{name}"' in source for name in names), "a template nothing renders"
    with pytest.raises(ValueError, match="seed.conf"):
        render.fill("seed.conf", table="t")
    with pytest.raises(ValueError, match="seed.conf"):
        render.fill("seed.conf", table="t", route="r", extra="x")
    assert "{{route}}" in render.fill("seed.conf", table="{{route}}", route="r")
    cfg = config.parse('[app]\ncommand = ["x"]\nports = [1, 2]\nbuild = "b"\n', Path("/srv/app/bluegreen.toml"))
    for text in (render_managed_conf(cfg, Path("/p"), Path("/p/up.conf"), runtime=True),
                 render_managed_conf(cfg, Path("/p"), Path("/p/up.conf")),
                 render.render_runtime("app", Path("/r"), Path("/c.sock")), render_upstream("app", 1, 2)):
        assert "{{" not in text, text
