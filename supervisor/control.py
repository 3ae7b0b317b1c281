"""The control socket server: read one request line, stream events, write one final reply.

The wire format is in protocol.py. A client that disconnects mid-swap does not stop the
swap; a client that sends nothing is dropped after IDLE_TIMEOUT; a line over the size
limit gets an error and a closed connection. Nothing a client sends can crash the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any, Awaitable, Callable

from . import protocol
from .errors import BluegreenError, RequestError

log = logging.getLogger("bluegreen.control")

IDLE_TIMEOUT = 10.0

Reply = Callable[[dict[str, Any]], None]
Handler = Callable[[protocol.Request, Reply], Awaitable[Any]]


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            # The daemon lock (daemon.py) guarantees no live daemon owns it: a stale leftover.
            self.path.unlink()
        old = os.umask(0o177)  # the socket is born 0600: only its owner may drive swaps
        try:
            self.server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=protocol.MAX_LINE + 1)
        finally:
            os.umask(old)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for task in list(self.connections):
            task.cancel()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)

        def reply(message: dict[str, Any]) -> None:
            if writer.is_closing():
                return  # the client left; the work it started goes on
            try:
                writer.write(protocol.encode(message))
            except (ConnectionError, RuntimeError):
                pass

        try:
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), IDLE_TIMEOUT)
            except asyncio.IncompleteReadError as e:
                line = e.partial  # `printf status | socat` sends no newline
                if not line:
                    return
            except asyncio.LimitOverrunError:
                raise RequestError(f"request line is longer than {protocol.MAX_LINE} bytes") from None
            except asyncio.TimeoutError:
                raise RequestError(f"no request line within {IDLE_TIMEOUT:g}s") from None
            request = protocol.parse_request(line)
            result = await self.handler(request, reply)
            reply(protocol.success(result))
        except BluegreenError as e:
            reply(protocol.failure(**e.to_dict()))
        except asyncio.CancelledError:
            reply(protocol.failure("shutting_down", "the daemon is shutting down"))
            raise
        except (ConnectionError, OSError):
            pass
        except Exception as e:  # never let one connection take the daemon down
            log.exception("internal error serving a control request")
            reply(protocol.failure("internal", f"internal error: {e!r}; see the daemon log"))
        finally:
            self.connections.discard(task)
            try:
                await asyncio.wait_for(writer.drain(), 5)
            except (ConnectionError, OSError, asyncio.TimeoutError, asyncio.CancelledError):
                pass
            writer.close()
