"""Config validation: every bad key is named, with what was expected; all problems at once."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import manual
from supervisor.config import schema as config
from supervisor.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CFG = Path("/srv/app/bluegreen.toml")

MINIMAL = """
[app]
command = ["node", "server.js"]
ports = [8001, 8002]
build = "releases/1"
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config.parse(text, CFG)
    return e.value.problems


def test_minimal_config_gets_documented_defaults() -> None:
    c = config.parse(MINIMAL, CFG)
    assert c.app.command == ("node", "server.js")
    assert c.app.cwd == "{build}"
    assert c.app.build == Path("/srv/app/releases/1")  # relative to the config file
    assert c.daemon.state_dir == Path("/srv/app/run")
    assert c.daemon.socket == Path("/srv/app/run/bluegreen.sock")
    assert c.app.ready.url is None and c.app.ready.timeout == 60
    assert c.app.stop.signal == signal.SIGTERM and c.app.stop.timeout == 30
    assert c.drain.timeout == 30
    assert c.nginx.mode == "managed" and c.nginx.listen == "127.0.0.1:8080"
    assert c.app.port("blue") == 8001 and c.app.port("green") == 8002


def test_example_config_is_valid_and_documents_every_key() -> None:
    c = config.load(ROOT / "config.example.toml")
    assert c.nginx.mode == "managed"
    text = (ROOT / "config.example.toml").read_text()
    for section, keys in config.SCHEMA.items():
        for key in keys:
            assert re.search(rf"^#?\s*{key.name}\s*=", text, re.M), f"{section}.{key.name} is not in config.example.toml"


@pytest.mark.parametrize(
    "snippet, expected",
    [
        ('[app]\ncolour = "blue"', "app.colour: unknown key"),
        ("[daemon]\nsockett = 'x'", "daemon.sockett: unknown key"),
        ("[nginx]\nlisten = 'localhost:http'", "nginx.listen: expected"),
        ("[app.ready]\ntimeout = -1", "app.ready.timeout: expected a number of seconds greater than 0, got -1"),
        ("[app.stop]\nsignal = 'SIGNOPE'", "app.stop.signal: unknown signal name"),
        ("[drain]\ntimeout = 'long'", "drain.timeout: expected a number"),
        ("[nginx]\nmode = 'docker'", 'nginx.mode: expected one of "managed", "external"'),
        ("[logging]\nlevel = 'debug'", "[logging]: unknown section"),
        ("[app.ready]\nurl = 'http://127.0.0.1:{prot}/'", "app.ready.url: unknown placeholder {prot}"),
        ("[app.ready]\nurl = 'tcp://127.0.0.1:{port}'", "app.ready.url: expected an http:// URL"),
        ("[release]\npreview_header = 'X Preview'", "release.preview_header: expected a name like 'X-Bluegreen-Preview'"),
        ("[release]\npreview_cookie = 'a;b'", "release.preview_cookie: expected a name like 'bluegreen_preview'"),
        ("[release]\nkeep_warm = -5", "release.keep_warm: expected a number of seconds, 0 or more"),
        ("[release]\npause_timeout = 0", "release.pause_timeout: expected a number of seconds greater than 0"),
        ("[hooks]\nbefore_switch = 'migrate expand'", "hooks.before_switch: expected a non-empty list of strings"),
        ("[hooks]\nafter_switch = ['{build}/migrate', '{versoin}']", "hooks.after_switch[1]: unknown placeholder"),
        ("[hooks]\nafter_switch_failed = 'ignore'", 'hooks.after_switch_failed: expected one of "warn", "rollback"'),
        ("[rollout]\nsteps = [50, 25]", "rollout.steps: shares must rise"),
        ("[rollout]\nsteps = [5, 101]", "rollout.steps: each share is a percentage of users, 1-100; got 101"),
        ("[rollout]\nmax_error_rate = 5", "rollout.max_error_rate: expected a fraction between 0 and 1"),
        ("[rollout]\nsteps = [5, 100]\n[nginx]\nswitch = 'reload'", "rollout.steps: needs the runtime switch"),
        ("[release]\nwatch_seconds = 30\n[nginx]\nswitch = 'reload'", "release.watch_seconds: needs the runtime switch"),
        # TOML's nan and inf are floats: no timeout, ratio or share means them
        ("[drain]\ntimeout = nan", "drain.timeout: expected a number of seconds greater than 0 (a finite one: nan and inf mean nothing here)"),
        ("[release]\nkeep_warm = inf", "release.keep_warm: expected a number of seconds, 0 or more (a finite one"),
        ("[rollout]\nerror_ratio = inf", "rollout.error_ratio: expected a factor greater than 0, like 2 (a finite one"),
        ("[drain]\ntimeout = 1e300", "drain.timeout: expected at most 31536000 seconds (a year), got 1e+300"),
        ("[rollout]\nmax_error_rate = nan", "rollout.max_error_rate: expected a fraction between 0 and 1"),
        ("[[release.checks]]\npath = '/'\ntimeout = nan", "release.checks[0].timeout: seconds, a positive finite number"),
        ("[daemon]\nmetrics_listen = '8001'", "daemon.metrics_listen: port 8001 is also app.ports (blue); choose"),
        ("[daemon]\nmetrics_listen = '127.0.0.1:8080'", "daemon.metrics_listen: port 8080 is also nginx.listen; choose"),
        # long-lived paths become nginx parameters; a TCP service has no path, header, cookie or answer to count
        ("[drain]\nlong_lived_paths = ['/" + "a" * 1100 + "']", "drain.long_lived_paths: a path has at most 1024"),
        ("[drain]\nlong_lived_grace = -1", "drain.long_lived_grace: expected a number of seconds, 0 or more"),
        ("[app]\nprotocol = 'tcp'\n[rollout]\nsteps = [5, 100]", 'rollout.steps: app.protocol = "tcp" has no rollout'),
        ("[app]\nprotocol = 'tcp'\n[release]\nwatch_seconds = 5", 'release.watch_seconds: app.protocol = "tcp" has no'),
        ("[app]\nprotocol = 'tcp'\n[drain]\nlong_lived_paths = ['/x']", 'drain.long_lived_paths: app.protocol = "tcp"'),
        ("[app]\nprotocol = 'tcp'\n[nginx]\nswitch = 'runtime'", 'nginx.switch: "runtime", and app.protocol = "tcp"'),
        ("[app]\nprotocol = 'grpc'\n[app.ready]\nurl = 'http://127.0.0.1:{port}/'", "app.ready.url: an HTTP check"),
        ("[app.ready]\nexpect = 'PONG'", 'app.ready.expect: only used with app.protocol = "tcp"'),
        ("[app]\nprotocol = 'udp'", 'app.protocol: expected one of "http", "grpc", "tcp"'),
    ],
)
def test_bad_key_is_named(snippet: str, expected: str) -> None:
    # MINIMAL's [app] table is extended (TOML allows no second [app] header).
    text = MINIMAL.replace("[app]\n", "[app]\n" + snippet.split("\n", 1)[1] + "\n") if snippet.startswith("[app]\n") \
        else MINIMAL + "\n" + snippet
    assert any(expected in p for p in problems(text)), problems(text)


def test_ports_must_differ() -> None:
    text = MINIMAL.replace("[8001, 8002]", "[8001, 8001]")
    assert problems(text) == ["app.ports: two different ports are needed, got [8001, 8001]"]


def test_command_must_be_an_argv_list_never_a_shell_string() -> None:
    text = MINIMAL.replace('["node", "server.js"]', '"node server.js"')
    assert problems(text)[0].startswith("app.command: expected a non-empty list of strings")


def test_all_problems_are_reported_at_once() -> None:
    text = """
[app]
command = "node server.js"
ports = [1, 1]
extra = true
[nginx]
mode = "external"
"""
    found = problems(text)
    for key in ("app.command", "app.ports", "app.build: missing", "app.extra", "nginx.upstream_file",
                "nginx.pid_file"):
        assert any(p.startswith(key) for p in found), (key, found)


def test_external_mode_needs_upstream_file_and_pid_file_and_rejects_managed_keys() -> None:
    found = problems(MINIMAL + '[nginx]\nmode = "external"\nlisten = "127.0.0.1:80"\n')
    assert 'nginx.upstream_file: required when nginx.mode = "external"' in found
    assert 'nginx.listen: only used when nginx.mode = "managed"; remove it' in found


def test_external_mode_defaults_its_commands() -> None:
    c = config.parse(MINIMAL + '[nginx]\nmode = "external"\nupstream_file = "up.conf"\npid_file = "/run/nginx.pid"\n', CFG)
    assert c.nginx.upstream_file == Path("/srv/app/up.conf")
    assert c.nginx.test_command == ("nginx", "-t")
    assert c.nginx.reload_command == ("nginx", "-s", "reload")


def test_the_shared_lua_handlers_file_is_for_several_runtime_apps_in_your_own_nginx() -> None:
    external = MINIMAL + '[nginx]\nmode = "external"\nupstream_file = "up.conf"\npid_file = "/run/nginx.pid"\n'
    c = config.parse(external + 'switch = "runtime"\nlua_handlers_file = "/etc/nginx/bluegreen/lua.conf"\n', CFG)
    assert c.nginx.lua_handlers_file == Path("/etc/nginx/bluegreen/lua.conf")
    assert config.parse(external, CFG).nginx.lua_handlers_file is None
    assert ('nginx.lua_handlers_file: only used with nginx.switch = "runtime"; remove it'
            in problems(external + 'switch = "reload"\nlua_handlers_file = "lua.conf"\n'))
    assert any(p.startswith("nginx.lua_handlers_file: must be another file than nginx.upstream_file")
               for p in problems(external + 'switch = "runtime"\nlua_handlers_file = "./up.conf"\n'))
    assert ('nginx.lua_handlers_file: only used when nginx.mode = "external"; remove it'
            in problems(MINIMAL + '[nginx]\nlua_handlers_file = "lua.conf"\n'))


def test_socket_path_too_long_for_unix_sockets_is_refused() -> None:
    found = problems(MINIMAL + f'[daemon]\nsocket = "/{"s" * 120}.sock"\n')
    assert found[0].startswith("daemon.socket:") and "at most 107" in found[0]


def test_missing_file_says_how_to_pass_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist; pass -c PATH"):
        config.load(tmp_path / "nope.toml")


def test_invalid_toml_is_a_config_error() -> None:
    assert "not valid TOML" in problems("[app\n")[0]


def test_expand_fills_placeholders_and_keeps_literal_braces() -> None:
    ctx = {"port": "8002", "slot": "green", "build": "/b/42", "build_name": "42", "slot_dir": "/s/green"}
    assert config.expand("{slot}:{port} {build_name} {{x}}", ctx) == "green:8002 42 {x}"


# Fuzz: whatever TOML a user writes, loading either succeeds or raises ConfigError (never crashes).
toml_scalars = st.one_of(st.integers(-5, 70000), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                         st.text(max_size=20), st.lists(st.integers(0, 70000), max_size=3),
                         st.lists(st.text(max_size=8), max_size=3))


def _toml_value(v: object) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([f"{s}.{k.name}" for s, ks in config.SCHEMA.items() for k in ks] + ["app.x"]),
                       toml_scalars, max_size=8))
def test_fuzzed_configs_load_or_fail_cleanly(values: dict[str, object]) -> None:
    sections: dict[str, list[str]] = {}
    for dotted, v in values.items():
        section, key = dotted.rsplit(".", 1)
        sections.setdefault(section, []).append(f"{key} = {_toml_value(v)}")
    text = "\n".join(f"[{s}]\n" + "\n".join(lines) for s, lines in sections.items())
    try:
        config.parse(text, CFG)
    except ConfigError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzzed_text_loads_or_fails_cleanly(text: str) -> None:
    try:
        config.parse(text, CFG)
    except ConfigError:
        pass


def test_the_manual_documents_every_key() -> None:
    text = manual()
    for section, keys in config.SCHEMA.items():
        for key in keys:
            assert f"`{section}.{key.name}`" in text, f"{section}.{key.name} is missing from docs/configuration.md"


def test_hooks_default_to_none_and_a_relative_program_is_relative_to_the_config_file() -> None:
    c = config.parse(MINIMAL, CFG)
    assert c.hooks.before_switch is None and c.hooks.timeout == 300 and c.hooks.after_switch_failed == "warn"
    assert c.release.keep_warm == 0 and c.release.pause_timeout == 3600
    c = config.parse(MINIMAL + '[hooks]\nbefore_switch = ["bin/migrate", "expand"]\n'
                     'after_switch = ["{build}/bin/migrate", "contract"]\nafter_failure = ["notify-send", "x"]\n', CFG)
    assert c.hooks.before_switch == ("/srv/app/bin/migrate", "expand")
    assert c.hooks.after_switch == ("{build}/bin/migrate", "contract")  # expanded at the swap
    assert c.hooks.after_failure == ("notify-send", "x")  # found on PATH


def test_logs_and_metrics_keys_are_checked_and_named() -> None:
    c = config.parse(MINIMAL, CFG)
    assert (c.logs.max_bytes, c.logs.backups, c.daemon.metrics_listen) == (10485760, 5, None)
    c = config.parse(MINIMAL.replace("[app]", '[logs]\nmax_bytes = 65536\nbackups = 2\n[app]')
                     + '[daemon]\nmetrics_listen = "9108"\n', CFG)
    assert (c.logs.max_bytes, c.logs.backups, c.daemon.metrics_listen) == (65536, 2, ("127.0.0.1", 9108))
    for text, problem in (("[logs]\nmax_bytes = 0", "logs.max_bytes: expected a size in bytes, at least 4096"),
                          ("[logs]\nbackups = 0", "logs.backups: expected a whole number greater than 0"),
                          ('[daemon]\nmetrics_listen = "127.0.0.1:99999"', "daemon.metrics_listen: expected")):
        with pytest.raises(ConfigError) as e:
            config.parse(MINIMAL + "\n" + text + "\n", CFG)
        assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_the_config_reference_is_the_one_generated_from_the_schema() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "config-reference"), "--check"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr  # if not: run scripts/config-reference and commit docs/configuration.md
    from supervisor.config.reference import reference

    assert reference() in (ROOT / "docs" / "configuration.md").read_text()
    for section, keys in config.SCHEMA.items():
        assert all(key.help for key in keys), f"a key of [{section}] has no help text for the reference"


def test_the_files_the_daemon_writes_for_your_nginx_need_their_directory(tmp_path: Path) -> None:
    cfg = tmp_path / "bluegreen.toml"
    cfg.write_text(MINIMAL + '[nginx]\nmode = "external"\nswitch = "runtime"\nupstream_file = "conf/up.conf"\n'
                   'pid_file = "/run/nginx.pid"\nlua_handlers_file = "/nonexistent-bluegreen-dir/lua.conf"\n')
    r = subprocess.run([sys.executable, "-m", "supervisor", "check-config", "-c", str(cfg)], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"nginx.upstream_file: the directory {tmp_path / 'conf'} does not exist; create it" in r.stderr, r.stderr
    assert "nginx.lua_handlers_file: the directory /nonexistent-bluegreen-dir does not exist" in r.stderr, r.stderr
    (tmp_path / "conf").mkdir()
    r = subprocess.run([sys.executable, "-m", "supervisor", "check-config", "-c", str(cfg)], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert "nginx.upstream_file" not in r.stderr and "nginx.lua_handlers_file" in r.stderr, r.stderr


def test_app_ports_the_kernel_gives_to_outgoing_connections_are_warned_about(tmp_path: Path) -> None:
    """A port in net.ipv4.ip_local_port_range can be held by a client's TIME-WAIT: the app's listen
    then fails. check-config says so (a warning: the config is valid), naming the range."""
    from helpers import ROOT
    from supervisor.config.host import ephemeral_ports

    ephemeral = ephemeral_ports()
    assert ephemeral is not None
    build = tmp_path / "build"
    build.mkdir()
    for ports, warned in (((ephemeral.start, ephemeral.start + 1), True), ((ephemeral.start - 2, ephemeral.start - 1), False)):
        cfg = tmp_path / "bg.toml"
        cfg.write_text(f'[app]\ncommand = ["sh", "-c", "true"]\nports = [{ports[0]}, {ports[1]}]\nbuild = "{build}"\n')
        r = subprocess.run([sys.executable, "-m", "supervisor", "check-config", "-c", str(cfg)], capture_output=True,
                           text=True, cwd=ROOT)
        assert r.returncode == 0, r.stdout + r.stderr
        assert ("warning: app.ports: " in r.stdout and "net.ipv4.ip_local_port_range" in r.stdout
                and f"choose ports below {ephemeral.start}" in r.stdout) == warned, r.stdout
    cfg.write_text(cfg.read_text() + f'[nginx]\nlisten = "127.0.0.1:{ephemeral.start + 5}"\n')
    r = subprocess.run([sys.executable, "-m", "supervisor", "check-config", "-c", str(cfg)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0 and f"warning: nginx.listen: port {ephemeral.start + 5} is inside" in r.stdout, r.stdout


@pytest.mark.parametrize("data", [b"\xff\xfe[\x00d\x00a\x00e\x00", "[app]\ncommand = ['caf\xe9']\n".encode("latin-1")])
def test_a_config_that_is_not_utf8_is_one_line_naming_the_fix(tmp_path: Path, data: bytes) -> None:
    """A config saved as UTF-16 (Notepad) or Latin-1: every command says so in one line, exit 2."""
    from helpers import ROOT

    cfg = tmp_path / "bg.toml"
    cfg.write_bytes(data)
    for argv in (["check-config"], ["status"], ["logs", "daemon"], ["daemon"]):
        r = subprocess.run([sys.executable, "-m", "supervisor", *argv, "-c", str(cfg)], capture_output=True,
                           text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 2, (argv, r.stdout, r.stderr)
        assert "is not UTF-8 text" in r.stderr and "save it as UTF-8" in r.stderr and "Traceback" not in r.stderr
