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
from typing import NamedTuple

import numpy as np

__all__ = ["ZIP_DATE_TIME", "ArchiveError", "ArrayHeader", "NpzArchive", "atomic_write", "remove_stale_temporaries",
           "write_json", "write_npy_entry", "write_npz", "write_text"]

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


# ----------------------------------------------------------------------------------------------
# reading .npz files with bounded work: headers first, then only the arrays asked for


class ArchiveError(ValueError):
    """An .npz file that is not a well-formed zip of plain .npy entries."""


class ArrayHeader(NamedTuple):
    """An .npy entry's header, read without its data: shape, dtype and the bytes the data takes."""

    shape: tuple
    dtype: np.dtype
    fortran_order: bool
    nbytes: int
    data_offset: int  # bytes of magic + header before the data


_SIMPLE_KINDS = "biufcU"  # no objects (pickles), no structured or void dtypes
_MAX_ENTRY_NAME = 4096


class NpzArchive:
    """An .npz file opened for bounded reading: `headers` (every entry's ArrayHeader) is known after
    reading only the zip directory and the first bytes of each entry, so a caller can check names,
    counts, shapes and dtypes before reading any array. `read(key)` then decompresses exactly the
    bytes the entry's header declares (an entry whose zip size disagrees with its header is refused
    before its data is read), so a deflate bomb costs no more than the array it claims to be.

        with NpzArchive(path, max_entries=1000) as npz:
            check(npz.headers)                # names, shapes, dtypes: nothing decompressed yet
            array = npz.read("wte.weight", max_bytes=2**30)

    Errors are ArchiveError (a ValueError) naming the file and the entry.
    """

    def __init__(self, file, *, name: str | None = None, max_entries: int = 100_000):
        self.name = name if name is not None else str(getattr(file, "name", file))
        try:
            self._zip = zipfile.ZipFile(file)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise ArchiveError(f"{self.name!r} is not a readable .npz (zip) file "
                               f"({type(exc).__name__}: {exc})") from exc
        try:
            self.headers = self._read_headers(max_entries)
        except BaseException:
            self._zip.close()
            raise

    def __enter__(self) -> NpzArchive:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()

    def _fail(self, what: str) -> ArchiveError:
        return ArchiveError(f"{self.name!r}: {what}")

    def _read_headers(self, max_entries: int) -> dict[str, ArrayHeader]:
        infos = self._zip.infolist()
        if len(infos) > max_entries:
            raise self._fail(f"has {len(infos)} entries, more than the {max_entries} expected")
        headers: dict[str, ArrayHeader] = {}
        self._infos: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if not info.filename.endswith(".npy") or len(info.filename) > _MAX_ENTRY_NAME or info.is_dir():
                raise self._fail(f"entry {info.filename[:200]!r} is not an .npy array")
            key = info.filename[: -len(".npy")]
            if key in headers:
                raise self._fail(f"entry {key!r} appears twice")
            if info.flag_bits & 0x1:
                raise self._fail(f"entry {key!r} is encrypted")
            headers[key] = self._read_header(key, info)
            self._infos[key] = info
        return headers

    def _read_header(self, key: str, info: zipfile.ZipInfo) -> ArrayHeader:
        try:
            with self._zip.open(info) as entry:
                version = np.lib.format.read_magic(entry)
                if version == (1, 0):
                    shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(entry)
                elif version == (2, 0):
                    shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(entry)
                else:
                    raise ValueError(f"unsupported .npy format version {version}")
                data_offset = entry.tell()
        except Exception as exc:  # a bad zip or deflate stream, a short entry, a header numpy cannot read
            raise self._fail(f"entry {key!r} has no valid .npy header ({type(exc).__name__}: {exc})") from exc
        dtype = np.dtype(dtype)
        if dtype.hasobject or dtype.kind not in _SIMPLE_KINDS or dtype.fields is not None or dtype.subdtype:
            raise self._fail(f"entry {key!r} has dtype {dtype}: only plain numbers and strings are read "
                             "(nothing is unpickled)")
        if any(not isinstance(n, int) or n < 0 for n in shape):
            raise self._fail(f"entry {key!r} has an invalid shape {shape}")
        count = 1
        for n in shape:
            count *= n
        nbytes = count * dtype.itemsize
        if info.file_size != data_offset + nbytes:
            raise self._fail(f"entry {key!r} holds {info.file_size} bytes, but its header declares "
                             f"{data_offset + nbytes} (shape {shape}, dtype {dtype})")
        return ArrayHeader(tuple(shape), dtype, bool(fortran_order), nbytes, data_offset)

    def read(self, key: str, *, max_bytes: int | None = None) -> np.ndarray:
        """The array of entry `key`, reading no more than its header declares (and max_bytes)."""
        if key not in self.headers:
            raise self._fail(f"has no entry {key!r}")
        header = self.headers[key]
        if max_bytes is not None and header.nbytes > max_bytes:
            raise self._fail(f"entry {key!r} declares {header.nbytes} bytes, more than the {max_bytes} allowed")
        buffer = bytearray(header.nbytes)
        try:
            with self._zip.open(self._infos[key]) as entry:
                entry.read(header.data_offset)
                view, filled = memoryview(buffer), 0
                while filled < header.nbytes:
                    n = entry.readinto(view[filled:filled + (1 << 24)])
                    if not n:
                        raise EOFError(f"the data ends after {filled} of {header.nbytes} bytes")
                    filled += n
                if entry.read(1):  # (also makes zipfile check the CRC)
                    raise ValueError("data after the declared array")
        except Exception as exc:
            raise self._fail(f"entry {key!r} cannot be read: the file is truncated or corrupt "
                             f"({type(exc).__name__}: {exc})") from exc
        array = np.frombuffer(buffer, dtype=header.dtype)
        if header.fortran_order:
            return array.reshape(header.shape[::-1]).transpose()
        return array.reshape(header.shape)


def write_npz(path, arrays: dict) -> None:
    """Write {key: array} as an .npz (write_npy_entry for each, in the dict's order), atomically."""
    with atomic_write(path, "wb") as file, zipfile.ZipFile(file, "w", allowZip64=True) as archive:
        for key, value in arrays.items():
            write_npy_entry(archive, key, value)
