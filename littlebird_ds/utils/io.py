"""The project's one atomic writer, and a free local port.

Every file other code may read while it is being written (results, reports, ``DONE.json``,
checkpoints' ``latest``, plots) goes through :func:`atomic_write_text` /
:func:`atomic_write_json`: a temporary file in the same folder (named ``.tmp-*``, which the
checkpoint manager sweeps), flushed and fsynced, then ``os.replace``, then the folder fsynced.
A reader sees the old content or the new, never a mix; an error leaves no file behind.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TMP_PREFIX = ".tmp-"


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename inside ``folder`` durable (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO], None], binary: bool = False) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then move it into place."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-" + os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)  # mkstemp makes the file owner-only; give it what open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = None,
                      default: Callable[[Any], Any] | None = None) -> None:
    """JSON, UTF-8 kept as is; an object JSON cannot hold raises before anything is written
    (pass ``default=str`` to write paths and the like as strings)."""
    text = json.dumps(obj, ensure_ascii=False, indent=indent, default=default)
    atomic_write_text(path, text + ("\n" if indent else ""))


def atomic_savefig(fig, path: str | os.PathLike[str], **kwargs) -> Path:
    """``fig.savefig`` through :func:`atomic_write` (format from ``path``'s suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, **kwargs), binary=True)
    return Path(path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
