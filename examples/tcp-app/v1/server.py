"""A length-prefixed RPC service over plain TCP (as Thrift's framed transport, Dubbo or a
Redis-protocol service frame their calls), that knows nothing about bluegreen.

A call is a 4-byte big-endian length, then that many bytes; its answer is framed the same way:
"<version> <call>". "PING" answers "PONG <version>"; "sleep MS" answers after MS milliseconds.
Connections stay open for as many calls as the client makes (clients pool them). On SIGTERM it
stops accepting and exits once its clients have closed their connections, as most servers do:
it never closes a client's connection by itself.
"""

import asyncio
import os
import signal
import struct
import sys
from pathlib import Path

port = int(os.environ.get("PORT", "0"))
if not port:
    sys.exit("PORT is not set")
version = os.environ.get("APP_VERSION") or Path("VERSION").read_text().strip()
open_connections: set[asyncio.Task] = set()


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    open_connections.add(asyncio.current_task())
    try:
        while True:
            (size,) = struct.unpack("!I", await reader.readexactly(4))
            call = await reader.readexactly(size)
            if call == b"PING":
                answer = f"PONG {version}".encode()
            else:
                if call.startswith(b"sleep "):
                    await asyncio.sleep(int(call.split()[1]) / 1000)
                answer = f"{version} ".encode() + call
            writer.write(struct.pack("!I", len(answer)) + answer)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
        open_connections.discard(asyncio.current_task())


async def main() -> None:
    await asyncio.sleep(int(os.environ.get("BOOT_MS", "0")) / 1000)  # a slow start, if asked (the bench)
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    print(f"[{version} pid {os.getpid()}] serving framed calls on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"[{version}] stopping: no new connections; exiting once the open ones close", flush=True)
    server.close()
    while open_connections:
        await asyncio.sleep(0.05)


asyncio.run(main())
