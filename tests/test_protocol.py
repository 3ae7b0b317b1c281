"""The control protocol: JSON or words in, a validated request out, or a clear error."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor import protocol
from supervisor.commands import specs
from supervisor.errors import RequestError

TABLE = specs()


def test_json_request() -> None:
    r = protocol.parse_request(b'{"cmd": "swap", "build": "/srv/app/42"}\n', TABLE)
    assert r == protocol.Request("swap", {"build": "/srv/app/42"})


def test_words_request_like_socat_users_type() -> None:
    assert protocol.parse_request("swap /srv/app/43\n", TABLE) == protocol.Request("swap", {"build": "/srv/app/43"})
    assert protocol.parse_request("status", TABLE) == protocol.Request("status", {})
    assert protocol.parse_request("swap", TABLE) == protocol.Request("swap", {})


@pytest.mark.parametrize(
    "line, message",
    [
        (b"", "empty request"),
        (b"{not json", "invalid JSON"),
        (b'{"cmd": "status"', "invalid JSON"),
        (b"{}", 'missing "cmd"'),
        (b'["status"]', "unknown command '[status]'"),
        (b'swap "/unbalanced', "cannot split the words"),
        (b'{"cmd": "status", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}", "nested too deeply"),
        (b"x" * 60000, "(60000 characters)"),
        (b'{"cmd": "deploy"}', "unknown command 'deploy'; known commands: swap, promote, abort, rollback, cancel, status, history, pause, resume, quit, help"),
        (b"launch /x", "unknown command 'launch'"),
        (b'{"cmd": "swap", "build": 42}', "'build' must be a str, got int"),
        (b'{"cmd": "swap", "bulid": "/x"}', "unknown argument 'bulid'"),
        (b'{"cmd": 7}', 'missing "cmd"'),
        (b'{"cmd": "status", "v": 2}', "protocol version 2 is not supported"),
        (b"swap /a /b", "too many words"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b'{"cmd": "swap", "build": "/srv/\\ud800"}', "'build' is not valid Unicode"),
        (b'{"cmd": "swap", "build": "/x", "step_seconds": 1e999}', "'step_seconds' must be a finite number"),
    ],
)
def test_bad_requests_get_a_clear_error(line: bytes, message: str) -> None:
    with pytest.raises(RequestError) as e:
        protocol.parse_request(line, TABLE)
    assert message in e.value.message
    assert e.value.code == "bad_request"
    assert len(e.value.message) < 400  # a client's input is never echoed back whole


def test_words_take_a_quoted_path_with_spaces() -> None:
    assert protocol.parse_request('swap "/srv/my app/build 2"\n', TABLE).args == {"build": "/srv/my app/build 2"}
    assert protocol.parse_request("swap '/srv/my app'", TABLE).args == {"build": "/srv/my app"}


def test_line_over_the_limit_is_refused() -> None:
    with pytest.raises(RequestError, match="limit is 65536"):
        protocol.parse_request(b"{" + b" " * protocol.MAX_LINE + b"}", TABLE)


def test_replies_are_one_json_object_per_line() -> None:
    line = protocol.encode(protocol.failure("busy", "a swap is running", phase="ready"))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"ok": False, "error": {"code": "busy", "message": "a swap is running", "phase": "ready"}}
    assert protocol.parse_reply(protocol.encode(protocol.success({"a": 1}))) == {"ok": True, "result": {"a": 1}}


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_fuzzed_bytes_parse_or_fail_cleanly(line: bytes) -> None:
    try:
        r = protocol.parse_request(line, TABLE)
    except RequestError as e:
        assert e.message
    else:
        assert r.cmd in TABLE


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=10)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(["cmd", "build", "v", "x"]),
                       st.one_of(st.sampled_from(list(TABLE)), json_values), max_size=4))
def test_fuzzed_json_objects_parse_or_fail_cleanly(obj: dict[str, object]) -> None:
    try:
        r = protocol.parse_request(json.dumps(obj).encode(), TABLE)
    except RequestError as e:
        assert e.message
    else:
        assert r.cmd in TABLE and all(isinstance(v, str) for v in r.args.values())
