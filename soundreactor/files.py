"""Files we write: whole or absent, with the mode a new file gets under the user's umask.

A writer fills a temporary file beside the target, which is then flushed to disk and renamed over it, so a kill
or a full disk mid-write leaves the previous file (or none), never a torn one. Libraries that create files
themselves may make them private (safetensors' `save_file` creates 0600, `mkstemp` too): the file gets
0666 & ~umask before it is published, as `open()` would have made it, so a server running as another user can read
what we wrote whenever the user's umask allows it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def umask() -> int:
    """The process's umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (a no-op where directories cannot be opened, as on Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(temp)` to fill a temporary file beside `path`, then publish it as `path` (mode 0666 & ~umask).

    `write` may replace the temporary file (as safetensors does); whatever it raises propagates, and the
    temporary file is removed.
    """
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:  # the folder refuses new files (read-only or virtual file system, missing)
        raise OSError(err.errno, f"cannot write {path}: {err.strerror}") from None
    os.close(fd)
    temp = Path(name)
    try:
        write(temp)
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(temp, 0o666 & ~umask())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    """`atomic_write` of `data`."""
    atomic_write(path, lambda temp: temp.write_bytes(data))


def write_text(path: str | Path, text: str) -> None:
    """`atomic_write` of `text` as UTF-8."""
    write_bytes(path, text.encode())
