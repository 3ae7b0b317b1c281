"""A Redis-protocol service (RESP2) that knows nothing about bluegreen: what a real cache or
queue server looks like from outside, for the TCP drain (app.protocol = "tcp").

It answers PING, ECHO, GET, SET, DEL, INCR, DEBUG SLEEP (a slow call, as Redis's own) and
CLIENT/HELLO/SELECT/INFO well enough for redis-py and other clients. GET answers the value set,
or "<version>" for a key never set, so a client can tell which build answered. Every connection
stays open for as many calls as its client makes (clients pool them). It boots in BOOT_MS
milliseconds (default 1000: a slow start, as a real server loading its data). On SIGTERM it
stops accepting and exits once its clients have closed their connections; it never closes a
client's connection by itself. A reply it could not send is logged ("the peer closed while the
call ran"): a call the client lost.
"""

import asyncio
import os
import signal
import sys
from pathlib import Path

port = int(os.environ.get("PORT", "0"))
if not port:
    sys.exit("PORT is not set")
version = os.environ.get("APP_VERSION") or Path("VERSION").read_text().strip()
data: dict[bytes, bytes] = {}
connections: set[asyncio.Task] = set()


def bulk(value: bytes | None) -> bytes:
    return b"$-1\r\n" if value is None else b"$%d\r\n%s\r\n" % (len(value), value)


async def read_command(reader: asyncio.StreamReader) -> list[bytes]:
    """One command: an array of bulk strings (what clients send), or an inline command."""
    line = await reader.readuntil(b"\r\n")
    if not line.startswith(b"*"):
        return line.split()
    args = []
    for _ in range(int(line[1:-2])):
        size = int((await reader.readuntil(b"\r\n"))[1:-2])
        args.append((await reader.readexactly(size + 2))[:-2])
    return args


async def answer(args: list[bytes]) -> bytes:
    name = args[0].upper() if args else b""
    if name == b"PING":
        return bulk(args[1]) if len(args) > 1 else b"+PONG\r\n"
    if name == b"ECHO" and len(args) == 2:
        return bulk(args[1])
    if name == b"GET" and len(args) == 2:
        return bulk(data.get(args[1], version.encode()))
    if name == b"SET" and len(args) >= 3:
        data[args[1]] = args[2]
        return b"+OK\r\n"
    if name == b"DEL":
        return b":%d\r\n" % sum(data.pop(k, None) is not None for k in args[1:])
    if name == b"INCR" and len(args) == 2:
        data[args[1]] = b"%d" % (int(data.get(args[1], b"0")) + 1)
        return b":" + data[args[1]] + b"\r\n"
    if name == b"DEBUG" and len(args) == 3 and args[1].upper() == b"SLEEP":
        await asyncio.sleep(float(args[2]))
        return b"+OK\r\n"
    if name in (b"CLIENT", b"SELECT"):
        return b"+OK\r\n"
    if name == b"INFO":
        return bulk(f"# Server\r\nredis_version:7.0.0\r\napp_version:{version}\r\n".encode())
    return b"-ERR unknown command '%s'\r\n" % name.lower()


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    connections.add(asyncio.current_task())
    try:
        while True:
            try:
                args = await read_command(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the client closed between two calls
            reply = await answer(args)
            try:
                writer.write(reply)
                await writer.drain()
            except ConnectionError as e:
                print(f"[{version}] the peer closed while the call ran ({b' '.join(args[:2]).decode()!r}: {e})",
                      flush=True)
                return
    finally:
        writer.close()
        connections.discard(asyncio.current_task())


async def main() -> None:
    await asyncio.sleep(int(os.environ.get("BOOT_MS", "1000")) / 1000)
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    print(f"[{version} pid {os.getpid()}] serving RESP on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"[{version}] stopping: no new connections; exiting once the open ones close", flush=True)
    server.close()
    while connections:
        await asyncio.sleep(0.05)


asyncio.run(main())
