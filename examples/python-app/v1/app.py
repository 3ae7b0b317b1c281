"""A plain WSGI app that knows nothing about bluegreen: gunicorn gives it its port."""

import os
import time
from urllib.parse import parse_qs

VERSION = os.environ.get("APP_VERSION", "dev")


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/health":
        body = b"ok\n"
    elif path == "/slow":
        ms = int(parse_qs(environ.get("QUERY_STRING", "")).get("ms", ["1000"])[0])
        time.sleep(ms / 1000)
        body = f"{VERSION} slow {ms}\n".encode()
    else:
        body = f"hello from {VERSION}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
