"""A TCP service's drain on real sockets: the between-calls test (tcpinfo) and the call drain
(calls.CallDrain), which closes a pooled connection only between two calls and counts, never
assumes, what each close cost. Here the test plays the app (its side of each connection) and
its client at once: no nginx in between."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from helpers import wait_until
from supervisor.processes import calls, copies, procs, tcpinfo
from supervisor.processes.tcpinfo import TcpInfo


def reading(**kw: int) -> TcpInfo:
    base = dict(state=tcpinfo.ESTABLISHED, unread=0, not_sent=0, unacked=0, last_sent=8, last_received=8, last_ack=8,
                bytes_received=100, bytes_sent=100, data_in=10, data_out=10)
    return TcpInfo(**{**base, **kw})


def test_an_answer_a_jiffy_after_the_call_is_at_rest_and_a_call_after_the_answer_is_not() -> None:
    assert reading(last_sent=4, last_received=8).at_rest  # sent 4 ms ago, received 8 ms ago
    assert not reading(last_sent=8, last_received=4).at_rest  # a call came after the last answer


def test_a_tie_in_the_jiffy_times_is_busy_unless_the_acknowledgements_prove_the_order() -> None:
    assert not reading().at_rest  # same jiffy, everything acknowledged: a call may have come after
    assert reading(unacked=1).at_rest  # the answer is unacknowledged: no call came after it
    assert reading(last_ack=4).at_rest  # a bare acknowledgement came after the last data


def test_unread_unsent_or_never_answered_is_never_at_rest() -> None:
    assert not reading(last_sent=4, unread=20).at_rest
    assert not reading(last_sent=4, not_sent=1).at_rest
    assert not reading(bytes_sent=0, last_sent=200).at_rest  # asked, never answered anything
    assert reading(bytes_received=0, bytes_sent=0).at_rest  # never asked anything
    assert not reading(last_sent=4, state=8).at_rest  # CLOSE_WAIT: its peer is gone, not resting


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the client's side, the app's side) of one connection from nginx's TCP address."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.socket()
    client.bind(("127.0.0.5", 0))
    client.connect(listener.getsockname())
    app, _ = listener.accept()
    for s in (client, app):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    yield client, app
    for s in (client, app, listener):
        s.close()


class Echo(threading.Thread):
    """The app: answers each call ("N" -> "N ok"), after `delay` seconds for calls that start with "slow"."""

    def __init__(self, sock: socket.socket, delay: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.sock, self.delay = sock, delay
        self.refused = 0  # answers it could not send: its side was shut

    def run(self) -> None:
        try:
            self.serve()
        except OSError:
            pass  # the test's end reset it

    def serve(self) -> None:
        while data := self.sock.recv(100):
            if data.startswith(b"slow"):
                time.sleep(self.delay)
            try:
                self.sock.sendall(data + b" ok")
            except OSError:
                self.refused += 1


def closed(client: socket.socket) -> bool:
    """What a pool checks before it lends a connection: has the server closed it?"""
    try:
        return client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False


@contextlib.contextmanager
def draining(app: socket.socket, deadline: float) -> Iterator[calls.CallDrain]:
    """A call drain of the app's port (this process holds the app's side), stopped at the end."""
    drain = calls.CallDrain(app.getsockname()[1], lambda: {os.getpid()}, deadline)
    drain.start()
    try:
        yield drain
    finally:
        drain.stop()


def test_a_connection_at_rest_in_its_rhythm_is_closed_between_two_calls_and_counted_clean(pair) -> None:
    client, app = pair
    Echo(app).start()
    with draining(app, time.monotonic() + 60) as drain:
        answers = 0
        while not closed(client):  # a pool's caller: it checks its connection, calls, rests 10 ms
            client.sendall(b"call")
            assert client.recv(100) == b"call ok"
            answers += 1
            time.sleep(0.01)
        assert answers >= 3  # its rhythm was read first
        client.close()  # as a pool does with a connection it finds closed
        wait_until(drain.settled, 10, "the closed connection to be counted")
    tally = drain.snapshot()
    assert (tally.between_calls, tally.cut) == (1, 0), tally


def test_a_close_whose_client_never_comes_back_is_not_called_clean(pair) -> None:
    """Closed between two calls, but its client neither lets go nor calls within SETTLE: nothing
    proves its next call (sent without checking the connection) will not fail. Counted apart."""
    client, app = pair
    Echo(app).start()
    client.sendall(b"call")
    assert client.recv(100) == b"call ok"
    with draining(app, time.monotonic()) as drain:
        wait_until(drain.settled, 10, "the connection to be closed and counted")
    tally = drain.snapshot()
    assert (tally.between_calls, tally.unconfirmed + tally.unknown, tally.cut) == (0, 1, 0), tally


def test_a_call_in_flight_is_never_closed_before_the_deadline_then_cut_and_counted(pair) -> None:
    client, app = pair
    echo = Echo(app, delay=1.0)
    echo.start()
    client.sendall(b"slow call")
    with draining(app, time.monotonic() + 0.2) as drain:  # past 0.2 + QUEUED s it is cut where it is
        wait_until(drain.settled, 10, "the connection to be cut and counted")
    assert client.recv(100) == b""  # the answer never came: the call was cut
    tally = drain.snapshot()
    assert (tally.between_calls, tally.cut_in_flight, tally.cut_arrived) == (0, 1, 0), tally


def test_a_call_that_reaches_the_app_after_the_close_is_counted_as_cut(pair) -> None:
    """The deadline is now: the connection, at rest, is closed at once; the client's next call
    (sent before it read the end) reaches the app, which cannot answer it any more."""
    client, app = pair
    echo = Echo(app)
    echo.start()
    client.sendall(b"call")
    assert client.recv(100) == b"call ok"
    with draining(app, time.monotonic()) as drain:
        wait_until(lambda: drain.held and all(h.closed for h in drain.held.values()), 10, "the close")
        client.sendall(b"late call")
        wait_until(lambda: echo.refused, 10, "the app to fail to answer it")
        assert client.recv(100) == b""
        client.close()
        wait_until(drain.settled, 10, "the connection to be counted")
    tally = drain.snapshot()
    assert (tally.between_calls, tally.cut_arrived) == (0, 1), tally


def test_a_copy_is_kept_only_if_the_fd_still_names_the_connection_chosen(pair) -> None:
    client, app = pair
    inode = os.fstat(app.fileno()).st_ino
    copy = copies.take(os.getpid(), app.fileno(), inode)
    copy.close()
    with pytest.raises(copies.Replaced):  # the fd number now names another file
        copies.take(os.getpid(), client.fileno(), inode)


CHURN = """
import os, socket
kept = socket.socket()
os.dup2(kept.fileno(), 900)  # after every fd the loop below opens and closes
print(os.fstat(900).st_ino, flush=True)
while True:
    for s in [socket.socket() for _ in range(100)]:
        s.close()
"""


def test_an_app_closing_connections_while_its_fds_are_read_hides_none_of_the_others() -> None:
    """A busy app closes connections during every scan of its fd table: the fd that vanished is
    skipped, not the rest of the table (a stream found so was once reset, not closed with a copy)."""
    app = subprocess.Popen([sys.executable, "-c", CHURN], stdout=subprocess.PIPE, text=True)
    try:
        assert app.stdout is not None
        inode = int(app.stdout.readline())
        missed = sum(inode not in procs.socket_fds(app.pid) for _ in range(2000))
    finally:
        app.kill()
        app.wait()
    assert missed == 0
