"""safetensors files in NumPy alone: read any file that follows the format, write files others can read.

The format (huggingface/safetensors):

    8 bytes            N, the header length, unsigned 64-bit little-endian
    N bytes            a UTF-8 JSON object: {"<name>": {"dtype": "F32", "shape": [2, 3],
                       "data_offsets": [begin, end]}, ..., "__metadata__": {"<str>": "<str>"}}
                       (optional __metadata__; writers may pad the JSON with trailing spaces)
    the rest           the byte buffer: each tensor's elements little-endian in row-major order at
                       [begin, end) of the buffer; the tensors cover the buffer exactly, without
                       overlaps or holes

load_safetensors checks every number of the header against the file before it reads a byte of data
(header length against the file size and a 100 MiB bound, offsets against the buffer, each byte
length against dtype and shape, the ranges against each other), so a bad file raises
SafetensorsError (a ValueError) naming the problem, and nothing is read past the buffer.
Hugging Face's save_pretrained files and Elixir's `safetensors` library files (no header padding,
tensors sorted by name) both read.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import numpy as np

from .backend import to_numpy
from .files import atomic_write

__all__ = ["DTYPES", "MAX_HEADER_BYTES", "SafetensorsError", "load_safetensors", "save_safetensors"]

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's bound
METADATA_KEY = "__metadata__"
HEADER_ALIGNMENT = 8  # the JSON is padded with spaces so the buffer starts 8-byte aligned (as HF writes)

# safetensors dtype -> NumPy dtype as stored (little-endian). BF16 is read as its 16 bits and widened.
DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_WRITE_DTYPES = {(v.kind, v.itemsize): k for k, v in DTYPES.items() if k != "BF16"}  # (kind, bytes) -> name


class SafetensorsError(ValueError):
    """A file that is not a valid safetensors file (truncated, inconsistent header, unknown dtype...)."""


def _bad(path: str, problem: str) -> SafetensorsError:
    return SafetensorsError(f"safetensors file {path!r}: {problem}")


def _reject_duplicates(pairs):
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"duplicate keys {duplicates}")
    return dict(pairs)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_header(path: str, header_bytes: bytes, buffer_size: int):
    """The header's tensors as [(name, dtype name, shape, begin, end)] in header order, and metadata."""
    try:
        header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except UnicodeDecodeError as exc:
        raise _bad(path, f"the header is not UTF-8 ({exc})") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError, as are duplicate keys
        raise _bad(path, f"the header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _bad(path, f"the header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop(METADATA_KEY, None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise _bad(path, f"{METADATA_KEY} must be an object of strings, got {metadata!r}"[:300])
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _bad(path, f"tensor {name!r} must have exactly the keys dtype, shape and data_offsets, "
                       f"got {info!r}"[:300])
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype_name not in DTYPES:
            raise _bad(path, f"tensor {name!r} has the unknown or unsupported dtype {dtype_name!r}; "
                       f"supported: {sorted(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise _bad(path, f"tensor {name!r} has an invalid shape {shape!r} (a list of non-negative integers)")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)):
            raise _bad(path, f"tensor {name!r} has invalid data_offsets {offsets!r} ([begin, end], integers)")
        begin, end = offsets
        if begin > end or end > buffer_size:
            raise _bad(path, f"tensor {name!r} has data_offsets [{begin}, {end}] outside the {buffer_size}-byte "
                       "data buffer (truncated file?)")
        expected = math.prod(shape) * DTYPES[dtype_name].itemsize  # Python ints: no overflow
        if end - begin != expected:
            raise _bad(path, f"tensor {name!r} ({dtype_name}, shape {shape}) needs {expected} bytes, its "
                       f"data_offsets [{begin}, {end}] hold {end - begin}")
        entries.append((name, dtype_name, tuple(shape), begin, end))
    position = 0
    for name, _, _, begin, end in sorted(entries, key=lambda e: (e[3], e[4])):
        if begin < position:
            raise _bad(path, f"tensor {name!r} at [{begin}, {end}] overlaps the tensor before it (which ends at "
                       f"{position})")
        if begin > position:
            raise _bad(path, f"bytes [{position}, {begin}) of the data buffer belong to no tensor")
        position = end
    if position != buffer_size:
        raise _bad(path, f"the data buffer has {buffer_size} bytes, the tensors cover {position}")
    return entries, metadata


def load_safetensors(path, *, with_metadata: bool = False):
    """name -> NumPy array of a safetensors file, in header order (BF16 widened to float32).

    with_metadata=True returns (arrays, metadata) with metadata the __metadata__ dict (or None).
    Raises SafetensorsError (a ValueError) for a file that does not follow the format.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"safetensors file {path!r} does not exist")
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _bad(path, f"the file has {file_size} bytes, fewer than the 8 of the header length")
        header_size = int.from_bytes(prefix, "little")
        if header_size > MAX_HEADER_BYTES:
            raise _bad(path, f"the header length {header_size} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if header_size > file_size - 8:
            raise _bad(path, f"the header length {header_size} exceeds the {file_size - 8} bytes after it "
                       "(truncated file?)")
        header_bytes = f.read(header_size)
        if len(header_bytes) != header_size:
            raise _bad(path, "the file ended inside the header")
        buffer_size = file_size - 8 - header_size
        entries, metadata = _parse_header(path, header_bytes, buffer_size)
        arrays = {}
        data_start = 8 + header_size
        for name, dtype_name, shape, begin, end in entries:
            f.seek(data_start + begin)
            raw = f.read(end - begin)
            if len(raw) != end - begin:
                raise _bad(path, f"the file ended inside tensor {name!r}")
            values = np.frombuffer(raw, dtype=DTYPES[dtype_name]).reshape(shape)
            if dtype_name == "BF16":  # the upper half of a float32
                values = (values.astype(np.uint32) << 16).view(np.float32)
            arrays[name] = values.astype(values.dtype.newbyteorder("="), copy=True)
    return (arrays, metadata) if with_metadata else arrays


def save_safetensors(path, arrays: Mapping, metadata: Mapping | None = None) -> None:
    """Write name -> array (NumPy or CuPy; float64/32/16, int64/32/16/8, uint8, bool) as a safetensors
    file, atomically: tensors sorted by name, contiguous, little-endian; the header padded with spaces
    to a multiple of 8 bytes; metadata (str -> str) as __metadata__. BF16 cannot be written (NumPy has
    no bfloat16)."""
    if not isinstance(arrays, Mapping):
        raise TypeError(f"arrays must be a mapping of names to arrays, got {type(arrays).__name__}")
    header: dict = {}
    if metadata is not None:
        if not isinstance(metadata, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("metadata must be a mapping of str to str (the format's __metadata__), "
                            f"got {metadata!r}"[:300])
        header[METADATA_KEY] = dict(metadata)
    host = {}
    for name in sorted(arrays, key=lambda n: (not isinstance(n, str), str(n))):
        if not isinstance(name, str) or not name:
            raise TypeError(f"array names must be non-empty str, got {name!r}")
        if name == METADATA_KEY:
            raise ValueError(f"{METADATA_KEY!r} is reserved for the metadata; pass metadata= instead")
        value = to_numpy(arrays[name])
        key = (value.dtype.kind, value.dtype.itemsize)
        if key not in _WRITE_DTYPES:
            raise TypeError(f"arrays[{name!r}] has dtype {value.dtype}; safetensors files here hold float64/32/16, "
                            "int64/32/16/8, uint8 and bool")
        host[name] = (_WRITE_DTYPES[key], value.astype(value.dtype.newbyteorder("<"), order="C", copy=False))
    offset = 0
    for name, (dtype_name, value) in host.items():
        header[name] = {"dtype": dtype_name, "shape": list(value.shape),
                        "data_offsets": [offset, offset + value.nbytes]}
        offset += value.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % HEADER_ALIGNMENT)
    with atomic_write(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for _, value in host.values():
            f.write(value.tobytes(order="C"))
