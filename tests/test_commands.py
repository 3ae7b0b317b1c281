"""A control verb is one module: the protocol table, the CLI and the daemon's dispatch are built
from supervisor/commands/, so a new module is all a new verb needs."""

from __future__ import annotations

import argparse
import types
from pathlib import Path
from typing import Any

import pytest

from supervisor import cli, commands, protocol
from supervisor.protocol import CommandSpec


@pytest.fixture
def with_verb(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    verb = types.ModuleType("supervisor.commands.annotate")
    verb.SPEC = CommandSpec("annotate", "note something", {"now": (bool, False)}, order=50,
                            description="Note something.")
    verb.add_arguments = lambda p: p.add_argument("--now", action="store_true")

    async def handle(daemon: Any, reply: Any, now: bool = False) -> dict[str, bool]:
        return {"noted": now}

    verb.handle = handle
    verb.run = lambda sock, args: 0
    table = dict(commands.load())
    table["annotate"] = verb
    monkeypatch.setattr(commands, "load", lambda: table)
    return verb


def test_a_new_verb_module_is_on_the_wire_in_the_cli_and_in_help(with_verb: types.ModuleType) -> None:
    assert protocol.parse_request('{"cmd": "annotate", "now": true}', commands.specs()) == \
        protocol.Request("annotate", {"now": True})
    assert "annotate" in commands.specs()
    args = cli.build_parser().parse_args(["annotate", "--now", "--socket", "/x"])
    assert args.command == "annotate" and args.now


def test_every_verb_has_a_spec_a_handler_and_a_cli_runner() -> None:
    for name, verb in commands.load().items():
        assert verb.SPEC.name == name and verb.SPEC.help
        assert callable(verb.handle) and callable(verb.run)
    assert list(commands.load()) == ["swap", "promote", "abort", "rollback", "cancel", "status", "history", "pause",
                                     "resume", "quit", "help"]


def test_the_cli_offers_every_verb_with_its_own_arguments() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    assert set(commands.load()) | {"daemon", "check-config", "logs"} == set(sub.choices)
    assert parser.parse_args(["swap", "rel/42", "--json"]).build == "rel/42"
    assert parser.parse_args(["quit", "--keep-serving"]).keep_serving
    assert parser.parse_args(["status", "--timeout", "2"]).timeout == 2.0
    assert Path(parser.parse_args(["status", "--socket", "/s"]).socket) == Path("/s")


@pytest.mark.parametrize("error, said", [
    (PermissionError(13, "Permission denied", "/srv/app/run/state.json"),
     "bluegreen: permission denied: /srv/app/run/state.json; run this as the daemon's user (or root)"),
    (IsADirectoryError(21, "Is a directory", "/srv/app/run/logs/daemon.log"),
     "bluegreen: Is a directory: /srv/app/run/logs/daemon.log"),
])
def test_a_file_the_cli_cannot_read_is_one_line_never_a_traceback(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  error: OSError, said: str) -> None:
    def fails(args: argparse.Namespace) -> int:
        raise error

    monkeypatch.setattr(cli, "show_logs", fails)
    assert cli.main(["logs", "daemon", "-c", "/srv/app/bluegreen.toml"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(said) and err.count("\n") == 1 and "Traceback" not in err, err


def test_options_typed_before_the_verb_are_the_verbs() -> None:
    assert cli.verb_first(["-c", "app.toml", "status"]) == ["status", "-c", "app.toml"]
    assert cli.verb_first(["--timeout", "2", "--socket", "s", "swap", "b"]) == ["swap", "--timeout", "2", "--socket",
                                                                                 "s", "b"]
    assert cli.verb_first(["-c", "status", "logs"]) == ["logs", "-c", "status"]  # a value named like a verb stays one
    for words in (["status", "-c", "x"], ["--version"], ["-h", "status"], ["-c", "x", "nope"], []):
        assert cli.verb_first(words) == words


def test_the_cli_builds_only_the_subcommand_it_runs() -> None:
    """`bluegreen status` neither loads nor describes the other verbs (a third of its start)."""
    only = cli.build_parser("status")
    sub = next(a for a in only._actions if a.dest == "command")  # noqa: SLF001 (argparse has no public way)
    assert list(sub.choices) == ["status"]
    assert set(next(a for a in cli.build_parser()._actions if a.dest == "command").choices) >= {"status", "swap", "logs"}


def test_a_verbs_help_names_only_the_options_its_cli_has() -> None:
    """`bluegreen --help` and `bluegreen VERB --help` speak the CLI's flags (--keep-serving), never the
    socket's field names (keep=true)."""
    import re

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    for name, verb in commands.load().items():
        said = f"{verb.SPEC.help} {verb.SPEC.description}"
        assert not re.search(r"\b\w+=(true|false)\b", said), (name, said)
        flags = {o for a in sub.choices[name]._actions for o in a.option_strings}  # noqa: SLF001
        own = re.sub(r"`(?:bluegreen )?(?!" + name + r"\b)[a-z-]+ [^`]*`", "", said)  # (another verb's line, quoted)
        for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", own):
            assert flag in flags, f"`{name}` help names {flag}, which `bluegreen {name}` does not take: {said}"
