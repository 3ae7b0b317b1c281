"""What this machine offers a config: nginx and its lua module, the kernel's port range, whether a
hook can run at all. The schema's machine checks (check-config, the daemon's start) ask here;
nothing here knows the schema."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def ephemeral_ports(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> range | None:
    """The ports the kernel hands to outgoing connections (None if it does not say)."""
    try:
        low, high = (int(x) for x in path.read_text().split())
    except (OSError, ValueError):
        return None
    return range(low, high + 1)


def hook_problems(name: str, program: Path) -> list[str]:
    """A hook that could not run at all, named now rather than in the middle of a release."""
    if os.sep not in str(program):
        if shutil.which(str(program)) is None:
            return [f"hooks.{name}: {str(program)!r} is not on PATH; give its full path"]
        return []
    if not program.is_file():
        return [f"hooks.{name}: {program} does not exist or is not a file"]
    if not os.access(program, os.X_OK):
        return [f"hooks.{name}: {program} is not executable (chmod +x {program})"]
    why = interpreter_problem(program)
    if why:
        return [f"hooks.{name}: {program} exists, but {why}; install it or fix that line"]
    return []


def interpreter_problem(program: Path) -> str | None:
    """What is wrong with the interpreter a script's `#!` line names (the kernel then says ENOENT
    or EACCES as if the script itself were at fault), or None; `#!/usr/bin/env NAME` looks NAME up."""
    try:
        with open(program, "rb") as f:
            first = f.readline(256)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    line = first[2:].rstrip(b"\n")
    if line.endswith(b"\r"):
        return "its first line (#!) ends with a carriage return: the file has Windows line ends (dos2unix it)"
    words = line.decode(errors="replace").replace("\t", " ").split(" ")
    words = [w for w in words if w]
    if not words:
        return None
    if not os.path.exists(words[0]):
        return f"its first line (#!) names {words[0]}, which is not installed"
    if not os.path.isfile(words[0]) or not os.access(words[0], os.X_OK):
        return f"its first line (#!) names {words[0]}, which is not an executable file"
    if os.path.basename(words[0]) == "env" and len(words) > 1 and not words[1].startswith("-") \
            and not shutil.which(words[1]):
        return f"its first line (#!) names {words[1]} (looked up by {words[0]}), which is not installed"
    return None


LUA_MODULES = (Path("/usr/lib/nginx/modules/ndk_http_module.so"), Path("/usr/lib/nginx/modules/ngx_http_lua_module.so"))
LUA_LIBRARY = Path("/usr/share/lua/5.1/resty/core.lua")
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")  # Debian's libnginx-mod-stream


@functools.lru_cache(maxsize=8)
def lua_missing(binary: str) -> str | None:
    """Why the managed nginx `binary` cannot run the runtime switch (None: it can).

    The files being there is not enough: Debian's module is built for Debian's nginx 1.22 and
    another build (nginx.org's, a custom one) refuses it. So `binary -t` loads the module into
    a throwaway prefix, as the managed nginx would."""
    missing = [str(p) for p in (*LUA_MODULES, LUA_LIBRARY) if not p.exists()]
    if missing:
        return f"{', '.join(missing)} not found: install Debian's lua module (apt-get install libnginx-mod-http-lua)"
    why = nginx_refuses(binary, "".join(f"load_module {m};\n" for m in LUA_MODULES),
                        "    lua_shared_dict probe 64k;\n    init_by_lua_block { require('ngx.balancer') }\n")
    if why:
        return (f"{binary} cannot load Debian's lua module ({why}); the module works only with Debian's own "
                "nginx package (apt-get install nginx libnginx-mod-http-lua)")
    return None


def protocol_missing(binary: str, protocol: str) -> str | None:
    """Why the managed nginx `binary` cannot serve app.protocol `protocol` (None: it can): grpc
    needs its HTTP/2 and gRPC modules, tried with `binary -t` as for lua_missing."""
    if protocol == "tcp":
        if not STREAM_MODULE.exists():
            return f"{STREAM_MODULE} not found: install Debian's stream module (apt-get install libnginx-mod-stream)"
        why = nginx_refuses(binary, f"load_module {STREAM_MODULE};\n", "",
                            "stream {\n    server { listen 127.0.0.1:9; proxy_pass 127.0.0.1:9; }\n}\n")
        return (f"{binary} cannot load Debian's stream module ({why}); it works only with Debian's own nginx "
                "package (apt-get install nginx libnginx-mod-stream)") if why else None
    if protocol != "grpc":
        return None
    why = nginx_refuses(binary, "", "    server {\n        listen 127.0.0.1:9 http2;\n"
                                    "        location / { grpc_pass grpc://127.0.0.1:9; }\n    }\n")
    if why:
        return (f"{binary} cannot proxy gRPC ({why}): it needs the http_v2 and grpc modules, which Debian's nginx "
                "package has (apt-get install nginx)")
    return None


def nginx_refuses(binary: str, main: str, http: str, after: str = "") -> str | None:
    """`binary -t` on a throwaway prefix whose nginx.conf has `main` at the top, `http` in its
    http block and `after` after it: its first error line, or None if it passes."""
    with tempfile.TemporaryDirectory(prefix="bluegreen-probe-") as tmp:
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(main + f"pid {tmp}/nginx.pid;\nerror_log stderr;\nevents {{}}\nhttp {{\n"
                        + "".join(f"    {k}_temp_path {tmp}/{k};\n" for k in ("client_body", "proxy", "fastcgi",
                                                                              "uwsgi", "scgi"))
                        + http + "}\n" + after)
        try:
            r = subprocess.run([binary, "-t", "-q", "-p", f"{tmp}/", "-c", str(conf), "-e", "stderr"],
                               capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{binary} -t could not run ({e})"
    if r.returncode == 0:
        return None
    lines = [ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
    return next((ln for ln in lines if "[emerg]" in ln or "[alert]" in ln), lines[0] if lines else "no output")


def resolve_binary(name: str) -> str | None:
    """Find an executable on PATH, then in /usr/sbin (not on a normal user's PATH on Debian)."""
    found = shutil.which(name)
    if found is None and os.sep not in name:
        found = shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    return found
