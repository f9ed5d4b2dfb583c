"""The file store: export the cases (one deterministic .npz per case plus manifest.json) and load them back.

Nothing is pickled; every file is written atomically; load_cases refuses anything that does not match the
manifest (names, dtypes, shapes, sha256) or a newer format version.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .. import __version__
from ..files import atomic_write, write_npy_entry
from ..validation import check_bool
from .cases import KINDS, VARIANTS, Case, _case, generate_cases
from .report import TOLERANCES

FORMAT_NAME = "kto_np-oracle-cases"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An .npz (zip of .npy, no pickle) with fixed timestamps and order: the same bytes every time."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, value in arrays.items():
            write_npy_entry(archive, key, value)
    return buffer.getvalue()


def _case_arrays(case: Case) -> dict[str, np.ndarray]:
    arrays = {f"inputs/{k}": v for k, v in case.inputs.items()}
    arrays.update({f"expected/{k}": v for k, v in case.expected.items() if v is not None})
    return arrays


def _array_signature(arr: np.ndarray) -> str:
    """dtype and shape in one string: "float64[4,8,11]", "bool[5]", "float64[]" for a 0-d array."""
    return f"{arr.dtype}[{','.join(str(d) for d in arr.shape)}]"


def _manifest_entry(case: Case, arrays: Mapping[str, np.ndarray], sha256: str) -> dict:
    entry = {
        "name": case.name,
        "file": case.file_name,
        "kind": case.kind,
        "variant": case.variant,
        "formula": case.formula,
        "absent": [k for k, v in case.expected.items() if v is None],
        "arrays": {k: _array_signature(v) for k, v in arrays.items()},
        "sha256": sha256,
    }
    if case.config is not None:
        entry["config"] = dict(case.config)
    return entry


def _manifest(entries: list[dict]) -> dict:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kto_np_version": __version__,
        "dtype": "float64",
        "description": (
            "Reference cases for KTO implementations, computed by kto_np in float64. One .npz per case "
            "(np.load(file, allow_pickle=False)): 'inputs/<name>' are the candidate's arguments, "
            "'expected/<name>' the outputs: loss or logps, grad/<name> = dL/d<name>, metrics/<TRL name>, "
            "model intermediates. labels are bool (True = desirable). A metric listed in 'absent' is None "
            "(its class is absent from the batch). Model state dicts use Hugging Face GPT2LMHeadModel names."
        ),
        "tolerances": {
            "rule": "max|candidate - reference| <= atol + rtol * max|reference|, per array",
            "float64": {k: {"rtol": r, "atol": a} for k, (r, a) in TOLERANCES["float64"].items()},
            "float32": {k: {"rtol": r, "atol": a} for k, (r, a) in TOLERANCES["float32"].items()},
            "note": ("float64 is for candidates computing in float64; float32 for candidates that compute in "
                     "float32 (or bfloat16 upcast): looser, and gradients looser than losses. "
                     "finite_differences applies when the oracle differentiates a loss-only candidate."),
        },
        "cases": entries,
    }


def export(out_dir, *, overwrite: bool = False) -> Path:
    """Write every reference case to out_dir (one .npz each plus manifest.json); returns the manifest path.

    Deterministic (the same bytes on every run) and atomic per file. Refuses a non-empty out_dir unless
    overwrite=True; with overwrite, case files listed by an old manifest and not rewritten are removed.
    """
    check_bool("overwrite", overwrite)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir must be a directory, got the file {str(out)!r}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"out_dir {str(out)!r} is not empty; pass overwrite=True "
                              "(kto-np oracle export --overwrite) to replace its cases")
    out.mkdir(parents=True, exist_ok=True)
    old_files = _old_case_files(out / MANIFEST_NAME)
    entries = write_cases(out, generate_cases())
    for stale in old_files - {e["file"] for e in entries}:
        (out / stale).unlink(missing_ok=True)
    return out / MANIFEST_NAME


def write_cases(out_dir, cases) -> list[dict]:
    """Write `cases` (one .npz each) and then their manifest.json into out_dir; returns the entries."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for case in cases:
        arrays = _case_arrays(case)
        data = _npz_bytes(arrays)
        with atomic_write(out / case.file_name, "wb") as file:
            file.write(data)
        entries.append(_manifest_entry(case, arrays, hashlib.sha256(data).hexdigest()))
    with atomic_write(out / MANIFEST_NAME, "w") as file:
        file.write(json.dumps(_manifest(entries), indent=1) + "\n")
    return entries


def _old_case_files(manifest_path: Path) -> set[str]:
    """Case files an existing kto_np manifest lists (plain names only), to clean up on overwrite."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = {e["file"] for e in manifest["cases"]} if manifest.get("format") == FORMAT_NAME else set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {f for f in files if isinstance(f, str) and f.endswith(".npz") and Path(f).name == f}


def _read_manifest(path) -> tuple[Path, dict]:
    path = Path(path)
    manifest_path = path / MANIFEST_NAME if path.is_dir() else path
    if not manifest_path.is_file():
        raise ValueError(f"{manifest_path}: missing file (no oracle manifest; run export first)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{manifest_path}: not a readable JSON manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{manifest_path}: not a {FORMAT_NAME} manifest (format = "
                         f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{manifest_path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{manifest_path}: format_version {version} is newer than this kto_np "
                         f"({__version__}) reads (up to {FORMAT_VERSION}); upgrade kto_np")
    if not isinstance(manifest.get("cases"), list) or not manifest["cases"]:
        raise ValueError(f"{manifest_path}: the manifest lists no cases")
    return manifest_path, manifest


def _load_case(folder: Path, entry: Mapping) -> Case:
    try:
        name, file_name, kind, variant, formula = (entry[k] for k in ("name", "file", "kind", "variant", "formula"))
        declared, absent, sha256 = entry["arrays"], entry["absent"], entry["sha256"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{folder / MANIFEST_NAME}: case entry {entry!r:.80} lacks {exc}") from exc
    if kind not in KINDS or variant not in VARIANTS[kind]:
        raise ValueError(f"{folder / MANIFEST_NAME}: case {name!r} has unknown kind/variant {kind!r}/{variant!r}")
    if not isinstance(file_name, str) or Path(file_name).name != file_name:
        raise ValueError(f"{folder / MANIFEST_NAME}: case {name!r} has an invalid file name {file_name!r}")
    path = folder / file_name
    if not path.is_file():
        raise ValueError(f"{path}: missing file (listed in the manifest for case {name!r})")
    data = path.read_bytes()
    arrays = {}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            for key in npz.files:
                arrays[key] = npz[key]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise ValueError(f"{path}: cannot read the arrays (truncated or corrupt file?): {exc}") from exc
    if set(arrays) != set(declared):
        missing, extra = sorted(set(declared) - set(arrays)), sorted(set(arrays) - set(declared))
        raise ValueError(f"{path}: arrays do not match the manifest (missing {missing}, unexpected {extra})")
    for key, signature in declared.items():
        if _array_signature(arrays[key]) != signature:
            raise ValueError(f"{path}: array {key!r} has shape and dtype {_array_signature(arrays[key])}, the "
                             f"manifest says {signature} (truncated or modified file?)")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: content does not match the manifest's sha256 (modified file?)")
    inputs = {k[len("inputs/"):]: v for k, v in arrays.items() if k.startswith("inputs/")}
    expected = {k[len("expected/"):]: v for k, v in arrays.items() if k.startswith("expected/")}
    expected.update({k: None for k in absent})
    return _case(name, kind, variant, formula, inputs, expected, entry.get("config"))


def load_cases(path) -> tuple[Case, ...]:
    """Read cases written by export (path: the folder or its manifest.json).

    Raises ValueError naming the file for a newer format version, a missing file, an unreadable or
    truncated array, or arrays that do not match the manifest (names, shapes, dtypes, sha256).
    """
    manifest_path, manifest = _read_manifest(path)
    return tuple(_load_case(manifest_path.parent, entry) for entry in manifest["cases"])

