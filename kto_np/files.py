"""Atomic file writes: a temporary file in the target's folder, fsync, then os.replace.

Whatever fails half-way, the file that was at `path` before stays as it was and no temporary file
is left behind. Only regular files are ever replaced: a character device or a FIFO at `path`
(`/dev/null`, `/dev/stdout`, a named pipe) is written through, in place; any other kind of file
(a socket, a block device) is refused. A symbolic link is followed: its target is replaced, the
link stays. Temporary files are named `.<name>.kto_np.<pid>.<random>.tmp`; those left by a process that
no longer runs (killed mid-write) are removed by the next write to the same folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
import zipfile

import numpy as np

__all__ = ["ZIP_DATE_TIME", "atomic_write", "remove_stale_temporaries", "write_json", "write_npy_entry",
           "write_text"]

ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # the zip epoch: the same arrays always give the same bytes
_TEMPORARY = re.compile(r"^\..+\.kto_np\.(\d+)\.[a-z0-9_]{8}\.tmp$")  # .<name>.kto_np.<pid>.<random>.tmp


def _new_file_mode(path: str) -> int:
    """The mode of the file being replaced, or what a plain open() would give a new file."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_directory(folder: str) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    if os.name != "posix":  # pragma: no cover - Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse
        pass
    finally:
        os.close(fd)


def _process_is_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, OSError):  # not a pid at all
        return False
    return True


def remove_stale_temporaries(folder) -> list[str]:
    """Remove the temporary files of atomic_write in `folder` whose writing process is gone.

    Returns the names removed. A temporary of a process still running (another writer, mid-write)
    is left alone.
    """
    folder = os.fspath(folder)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMPORARY.match(name)
        if match is None or _process_is_alive(int(match.group(1))):
            continue
        path = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.unlink(path)
                removed.append(name)
    return removed


@contextlib.contextmanager
def _write_through(path: str, mode: str):
    """A character device or FIFO: written in place (there is nothing to replace atomically)."""
    with open(path, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as file:
        yield file


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file for writing; on success it replaces `path`, on error it is removed.

        with atomic_write("out.json", "w") as f:
            f.write(text)

    A character device or FIFO at `path` is written through instead (never replaced); a socket or
    block device is a ValueError.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"path must be a str or os.PathLike of str, got {type(path).__name__}")
    if not path:
        raise ValueError("path must not be empty")
    path = os.path.realpath(path) if os.path.islink(path) else path
    try:
        kind = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        kind = None
    if kind is not None and stat.S_ISDIR(kind):
        raise ValueError(f"path must be a file name, got the directory {path!r}")
    if kind is not None and (stat.S_ISCHR(kind) or stat.S_ISFIFO(kind)):
        with _write_through(path, mode) as file:
            yield file
        return
    if kind is not None and not stat.S_ISREG(kind):
        raise ValueError(f"path {path!r} is neither a regular file, a character device nor a FIFO: "
                         "it is not replaced")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder)
    file_mode = _new_file_mode(path)
    fd, temp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.kto_np.{os.getpid()}.", suffix=".tmp",
                                     dir=folder)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp_path, file_mode)
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_path)
        raise
    _fsync_directory(folder)


def write_text(path, text: str) -> None:
    with atomic_write(path, "w") as file:
        file.write(text)


def write_json(path, obj) -> None:
    """Write `obj` as indented JSON (keys in insertion order), atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_npy_entry(archive: zipfile.ZipFile, key: str, array) -> None:
    """Add `array` as "<key>.npy" to an open zip (an .npz file): no pickle, uncompressed, with a fixed
    timestamp and mode, so that the same arrays always give the same bytes."""
    info = zipfile.ZipInfo(key + ".npy", date_time=ZIP_DATE_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3
    info.external_attr = 0o644 << 16
    with archive.open(info, "w", force_zip64=True) as entry:
        np.lib.format.write_array(entry, np.asarray(array), allow_pickle=False)
