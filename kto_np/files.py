"""Atomic file writes: a temporary file in the target's folder, fsync, then os.replace.

Whatever fails half-way, the file that was at `path` before stays as it was and no temporary file
is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import zipfile

import numpy as np

__all__ = ["ZIP_DATE_TIME", "atomic_write", "write_json", "write_npy_entry", "write_npz", "write_text"]

ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # the zip epoch: the same arrays always give the same bytes


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


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
    """Open a temporary file for writing; on success it replaces `path`, on error it is removed.

        with atomic_write("out.json", "w") as f:
            f.write(text)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"path must be a file name, got the directory {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    file_mode = _new_file_mode(path)
    fd, temp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
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


def write_npz(path, arrays: dict) -> None:
    """Write {key: array} as an .npz (write_npy_entry for each, in the dict's order), atomically."""
    with atomic_write(path, "wb") as file, zipfile.ZipFile(file, "w", allowZip64=True) as archive:
        for key, value in arrays.items():
            write_npy_entry(archive, key, value)
