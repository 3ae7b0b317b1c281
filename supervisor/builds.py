"""What a build is: a directory (an exploded app, a release checkout) or one file: an archive
(a Tomcat WAR, a fat JAR) or an executable (a single binary). An archive must be a zip: a broken
upload is refused before anything starts, not discovered by a servlet container mid-release. Any
other file (a config file, `/etc/passwd`) is no build."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from .errors import BuildError
from .protocol import clip

ARCHIVES = (".war", ".jar", ".ear", ".zip")
FORMS = "a directory (an exploded app) or a file (like app-1.4.war)"


def problem(path: Path) -> str | None:
    """Why `path` (existing, symlinks resolved) cannot be a build; None if it can."""
    if path.is_dir():
        return None
    if not path.is_file():
        return f"is neither {FORMS}"
    if path.suffix.lower() in ARCHIVES:
        try:
            ok = zipfile.is_zipfile(path)
        except OSError as e:
            return f"cannot be read: {e.strerror}"
        if not ok:
            return (f"is not a zip archive, so not a valid {path.suffix.lower()} (an upload cut short? rebuild it, "
                    "e.g. with `mvn package` or `jar cf`)")
        return None
    if not os.access(path, os.X_OK):
        return (f"is a file that is neither an archive ({', '.join(ARCHIVES)}) nor executable; a build is "
                f"{FORMS}")
    return None


def workdir(build: Path) -> Path:
    """The default working directory ({build}): the build itself, or the directory holding a file build."""
    return build if build.is_dir() or not build.exists() else build.parent


def check_build(build: Path) -> Path:
    """The build's real path: a `current -> releases/42` link is resolved now, at release time,
    so status, rollback and crash restarts name (and restart) what was released."""
    if "\0" in str(build):  # no file has such a name (the kernel's paths end at it)
        at = str(build).index("\0")
        raise BuildError(f"build path {clip(str(build))} holds a NUL byte (\\0) at character {at + 1}: no file "
                         "can be named so; send the path without it")
    if not build.is_absolute():
        raise BuildError(f"build path {clip(str(build))} must be absolute (the CLI resolves relative paths for you)")
    try:
        real = build.resolve(strict=True)
        why = problem(real)
        if why:
            raise BuildError(f"build {build} {why}")
    except FileNotFoundError:
        raise BuildError(f"build {clip(str(build))} does not exist; a build is {FORMS}") from None
    except (OSError, RuntimeError) as e:  # a name too long, a symlink loop, no permission
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise BuildError(f"build {clip(str(build))} cannot be used: {why}") from None
    return real
