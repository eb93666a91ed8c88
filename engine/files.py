"""Files a user gives and files written for a user. A path read from a file (a manifest, a shard index) is
taken only inside its folder (`inside`). A file written for a user never leaves a truncated file where a good
one was: it is written to a temporary file in the same folder, flushed to disk, then renamed over the target
in one step, and the folder flushed (`atomic_writer`)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from engine.errors import WuerstchenError


def inside(root: Path, relative: object, field: str) -> Path:
    """`root / relative` for a relative path that stays inside `root`: no absolute path, no `..`, no link that
    leads out. Anything else is a one-line error naming the field."""
    if not isinstance(relative, str) or not relative or "\\" in relative or "\0" in relative:
        raise WuerstchenError(f"{field}={relative!r}: expected a relative path inside the folder")
    parts = PurePosixPath(relative)
    if parts.is_absolute() or ".." in parts.parts:
        raise WuerstchenError(f"{field}={relative!r}: expected a relative path inside the folder, without '..'")
    path = root / relative
    if root.resolve() not in path.resolve().parents:
        raise WuerstchenError(f"{field}={relative!r} lies outside the folder (through a link)")
    return path


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s new content into; `path` changes only when the block ends without an
    error, and then all at once."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp's file is private (0600): give it the mode the file it replaces has, or a new file's.
        os.fchmod(handle, _mode(path))
        with os.fdopen(handle, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)  # the rename itself survives a crash


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries to disk, where the system lets a folder be opened for that (POSIX)."""
    try:
        handle = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems cannot sync a folder; the file itself is on disk
    finally:
        os.close(handle)


def write_atomically(path: str | Path, data: bytes) -> None:
    with atomic_writer(path) as file:
        file.write(data)


def _mode(path: Path) -> int:
    """The permissions of `path` if it exists, else those open() would give a new file (0666 less the umask)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (setting it to read it back would race
    with other threads creating files)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask
