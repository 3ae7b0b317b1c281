"""The standard gRPC health check (grpc.health.v1.Health/Check) over plain HTTP/2, without grpcio.

A unary call needs little of HTTP/2: the preface, one HEADERS frame (HPACK literals, no table,
no Huffman), one DATA frame, and the answer's DATA frames, whose message says SERVING or not.
The answer's headers are never decoded: a server that fails the call sends no message, which
is "not ready" whatever the reason (the reason is in the app's log).
"""

from __future__ import annotations

import asyncio
import struct
from ..aio import within

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x7
END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8
STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack("!I", len(payload))[1:] + bytes([kind, flags]) + struct.pack("!I", stream) + payload


def hpack_int(value: int, prefix_bits: int = 7) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out, value = bytearray([limit]), value - limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes(out + bytes([value]))


def varint(value: int) -> bytes:
    """A protobuf varint."""
    out = bytearray()
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes(out + bytes([value]))


def literal(name: str, value: str) -> bytes:
    """A header as an HPACK literal without indexing, new name, no Huffman."""
    n, v = name.encode(), value.encode()
    return b"\x00" + hpack_int(len(n)) + n + hpack_int(len(v)) + v


def request(port: int, service: str) -> bytes:
    headers = b"".join(literal(k, v) for k, v in (
        (":method", "POST"), (":scheme", "http"), (":path", "/grpc.health.v1.Health/Check"),
        (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"), ("te", "trailers")))
    name = service.encode()
    message = (b"\x0a" + varint(len(name)) + name) if name else b""  # HealthCheckRequest.service (field 1)
    return (PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS, 1, headers)
            + frame(DATA, END_STREAM, 1, b"\x00" + struct.pack("!I", len(message)) + message))


def unpadded(payload: bytes) -> bytes:
    """A padded frame's data: its first byte says how many bytes of padding end it."""
    return payload[1:len(payload) - payload[0]] if payload and payload[0] < len(payload) else b""


def status_of(body: bytes) -> str:
    """The HealthCheckResponse's status in a gRPC message (5-byte prefix, then field 1, a varint)."""
    if len(body) < 5:
        return "no answer message (is grpc.health.v1.Health served?)"
    message = body[5:5 + struct.unpack("!I", body[1:5])[0]]
    if message[:1] != b"\x08" or len(message) < 2:
        return STATUS[0]
    return STATUS.get(message[1], f"status {message[1]}")


async def check(port: int, service: str = "", timeout: float = 2.0) -> str:
    """Ask the app on `port` whether `service` ("": the whole server) is SERVING; its answer, or
    what went wrong. Raises OSError or asyncio.TimeoutError when it does not answer."""
    async def call() -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request(port, service))
            body = b""
            while True:
                head = await reader.readexactly(9)
                length = int.from_bytes(head[:3], "big")
                kind, flags, stream = head[3], head[4], struct.unpack("!I", head[5:9])[0] & 0x7FFFFFFF
                payload = await reader.readexactly(length)
                if kind == SETTINGS and not flags & ACK:
                    writer.write(frame(SETTINGS, ACK, 0))
                elif kind == RST_STREAM and stream == 1:
                    return "the server reset the call"
                elif kind == GOAWAY and len(payload) >= 8:
                    last, code = struct.unpack("!II", payload[:8])
                    if (last & 0x7FFFFFFF) < 1 or code:  # a graceful GOAWAY (NO_ERROR) still answers stream 1
                        return f"the server refused the call (GOAWAY, error code {code})"
                elif kind == DATA and stream == 1:
                    body += unpadded(payload) if flags & PADDED else payload
                if stream == 1 and kind in (DATA, HEADERS) and flags & END_STREAM:
                    return status_of(body)
        finally:
            writer.close()

    return await within(call(), timeout)
