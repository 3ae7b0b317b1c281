"""A gRPC service that knows nothing about bluegreen: it reads PORT, serves the standard health
service (grpc.health.v1.Health) and two methods with raw bytes (no generated code):

    /example.Echo/Say     unary: answers "<version> <request>"
    /example.Echo/Ticks   server streaming: "<version> 1", "<version> 2", ... every 100 ms

HEALTH=NOT_SERVING makes it say so to the health check (a build that must never get traffic).
On SIGTERM it stops taking calls and lets the ones in flight finish (up to 30 s), as
grpc.Server.stop(grace) does.
"""

import os
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

port = int(os.environ.get("PORT", "0"))
if not port:
    sys.exit("PORT is not set")
version = os.environ.get("APP_VERSION") or Path("VERSION").read_text().strip()


def say(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request.startswith(b"sleep "):  # "sleep MS": a slow call
        time.sleep(int(request.split()[1]) / 1000)
    return f"{version} ".encode() + request


def ticks(request: bytes, context: grpc.ServicerContext):
    n = 0
    while context.is_active():
        n += 1
        yield f"{version} {n}".encode()
        time.sleep(0.1)


time.sleep(int(os.environ.get("BOOT_MS", "0")) / 1000)  # a slow start, if asked (the bench)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("example.Echo", {
    "Say": grpc.unary_unary_rpc_method_handler(say),
    "Ticks": grpc.unary_stream_rpc_method_handler(ticks),
})])
checker = health.HealthServicer()
checker.set("", getattr(health_pb2.HealthCheckResponse, os.environ.get("HEALTH", "SERVING")))
health_pb2_grpc.add_HealthServicer_to_server(checker, server)
server.add_insecure_port(f"127.0.0.1:{port}")
server.start()
print(f"[{version} pid {os.getpid()}] serving gRPC on 127.0.0.1:{port}", flush=True)
stopped = threading.Event()


def stop(signum: int, frame: object) -> None:
    print(f"[{version}] {signal.Signals(signum).name}: finishing the calls in flight", flush=True)
    checker.enter_graceful_shutdown()
    server.stop(grace=30).wait()
    stopped.set()


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
stopped.wait()
