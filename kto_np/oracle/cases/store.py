"""The file store: export the cases (one deterministic .npz per case plus manifest.json) and load them back.

Nothing is pickled; every file is written atomically; load_cases refuses anything that does not match the
manifest (names, dtypes, shapes, sha256) or a newer format version.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ... import __version__
from ...edifice import EdificeConfig
from ...edifice import param_shapes as edifice_param_shapes
from ...files import ArchiveError, NpzArchive, atomic_write, write_npy_entry
from ...validation import check_bool
from ..compare.report import TOLERANCES
from .reference import KINDS, MODEL_CONFIG, VARIANTS, Case, _case, edifice_params_from_inputs, generate_cases

FORMAT_NAME = "kto_np-oracle-cases"
FORMAT_VERSION = 4  # 4: the kto_pair variant's cases, and the accumulation cases' pair_policy_logps /
# pair_ref_logps tables (those three files change; read without them, the window mistake is not compared);
# 3: the model_edifice kind (Axon-named params/, an EdificeConfig config); 2: unit_weights, kl_zero and
# kl_rotation +1 model cases (1: 37 cases). Otherwise the files of the older cases are unchanged.
MANIFEST_NAME = "manifest.json"
# bounds on what a case folder may make the reader do (the built-in cases are a few KiB each)
MAX_MANIFEST_BYTES = 16 * 2**20
MAX_CASE_FILE_BYTES = 256 * 2**20
MAX_CASE_ENTRIES = 1000


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


def _array_signature(arr) -> str:
    """dtype and shape in one string: "float64[4,8,11]", "bool[5]", "float64[]" for a 0-d array
    (of an array, or of an .npy header read without its data)."""
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
            "(its class is absent from the batch). Model state dicts use Hugging Face GPT2LMHeadModel names; "
            "model_edifice weights are 'inputs/params/<Axon layer>.<param>' (kernels [in, out])."
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
        if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            return set()
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
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ValueError(f"{manifest_path}: {manifest_path.stat().st_size} bytes, more than a manifest may hold "
                         f"({MAX_MANIFEST_BYTES})")
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
    if path.stat().st_size > MAX_CASE_FILE_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, more than a case file may hold ({MAX_CASE_FILE_BYTES})")
    if not isinstance(declared, dict):
        raise ValueError(f"{folder / MANIFEST_NAME}: case {name!r}: 'arrays' must map names to signatures")
    data = path.read_bytes()
    arrays = {}
    try:  # names, shapes and dtypes are checked against the manifest before any array is read
        with NpzArchive(io.BytesIO(data), name=str(path), max_entries=MAX_CASE_ENTRIES) as npz:
            if set(npz.headers) != set(declared):
                missing, extra = sorted(set(declared) - set(npz.headers)), sorted(set(npz.headers) - set(declared))
                raise ValueError(f"{path}: arrays do not match the manifest (missing {missing}, unexpected {extra})")
            for key, signature in declared.items():
                found = _array_signature(npz.headers[key])
                if found != signature:
                    raise ValueError(f"{path}: array {key!r} has shape and dtype {found}, the manifest says "
                                     f"{signature} (truncated or modified file?)")
            arrays = {key: npz.read(key) for key in npz.headers}
    except ArchiveError as exc:
        raise ValueError(f"{path}: cannot read the arrays (truncated or corrupt file?): {exc}") from exc
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: content does not match the manifest's sha256 (modified file?)")
    inputs = {k[len("inputs/"):]: v for k, v in arrays.items() if k.startswith("inputs/")}
    expected = {k[len("expected/"):]: v for k, v in arrays.items() if k.startswith("expected/")}
    if not isinstance(absent, list) or not all(isinstance(k, str) and k.startswith("metrics/") for k in absent):
        raise ValueError(f"{folder / MANIFEST_NAME}: case {name!r}: 'absent' may list metrics only (a metric "
                         f"whose class is absent from the batch), got {absent!r}")
    if set(absent) & set(expected):
        raise ValueError(f"{folder / MANIFEST_NAME}: case {name!r}: {sorted(set(absent) & set(expected))} both "
                         "absent and stored")
    expected.update({k: None for k in absent})
    config = entry.get("config")
    rotation = inputs.get("kl_rotation")
    if rotation is not None and (kind != "model_kto" or rotation.dtype != np.int64 or rotation.shape != ()
                                 or int(rotation) not in (-1, 1)):
        raise ValueError(f"{folder / MANIFEST_NAME}: case {name!r}: inputs/kl_rotation must be a 0-d int64 -1 or "
                         f"+1 of a model case, got {rotation!r}")
    if kind == "model_kto":
        _check_model_config(folder / MANIFEST_NAME, name, config, inputs)
    elif kind == "model_edifice":
        _check_edifice_config(folder / MANIFEST_NAME, name, config, inputs)
    elif config is not None:
        raise ValueError(f"{folder / MANIFEST_NAME}: case {name!r} of kind {kind!r} has a config; only model "
                         "cases have one")
    return _case(name, kind, variant, formula, inputs, expected, config)


MODEL_CONFIG_FIXED = {"layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "tie_word_embeddings": True,
                      "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def _check_model_config(manifest_path: Path, name: str, config, inputs: Mapping[str, np.ndarray]) -> None:
    """A model case's GPT2Config fields must be the ones kto_np's model computes and fit the state dict."""
    where = f"{manifest_path}: case {name!r}: invalid model config"
    if not isinstance(config, dict) or set(config) != set(MODEL_CONFIG):
        keys = sorted(config) if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{where}: expected the fields {sorted(MODEL_CONFIG)}, got {keys}")
    for key, value in MODEL_CONFIG_FIXED.items():
        if config[key] != value or type(config[key]) is not type(value):
            raise ValueError(f"{where}: {key} must be {value!r} (the model kto_np computes), got {config[key]!r}")
    sizes = {k: config[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")}
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    if sizes["n_embd"] % sizes["n_head"]:
        raise ValueError(f"{where}: n_embd {sizes['n_embd']} is not divisible by n_head {sizes['n_head']}")
    prefix = "state_dict/transformer."
    wte, wpe = inputs.get(prefix + "wte.weight"), inputs.get(prefix + "wpe.weight")
    layers = {k.split(".")[2] for k in inputs if k.startswith(prefix + "h.")}
    shapes = (None if wte is None else wte.shape, None if wpe is None else wpe.shape, len(layers))
    wanted = ((sizes["vocab_size"], sizes["n_embd"]), (sizes["n_positions"], sizes["n_embd"]), sizes["n_layer"])
    if shapes != wanted:
        raise ValueError(f"{where}: the state dict has wte {shapes[0]}, wpe {shapes[1]} and {shapes[2]} layers; "
                         f"the config says {wanted[0]}, {wanted[1]} and {wanted[2]}")


def _check_edifice_config(manifest_path: Path, name: str, config, inputs: Mapping[str, np.ndarray]) -> None:
    """A model_edifice case's config must be an EdificeConfig (float64, no dropout) that its params fit."""
    where = f"{manifest_path}: case {name!r}: invalid Edifice config"
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected the EdificeConfig.to_dict() fields, got {type(config).__name__}")
    try:
        edifice_config = EdificeConfig.from_dict(config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    if set(config) != set(edifice_config.to_dict()):
        raise ValueError(f"{where}: expected the fields {sorted(edifice_config.to_dict())}, got {sorted(config)}")
    if edifice_config.dtype != "float64" or edifice_config.dropout != 0.0:
        raise ValueError(f"{where}: dtype must be 'float64' and dropout 0.0 (the cases are exact), got "
                         f"{edifice_config.dtype!r} and {edifice_config.dropout!r}")
    params = edifice_params_from_inputs(inputs)
    found = {k: tuple(v.shape) for k, v in params.items()}
    wanted = edifice_param_shapes(edifice_config)
    if found != wanted:
        missing, extra = sorted(set(wanted) - set(found)), sorted(set(found) - set(wanted))
        wrong = sorted(k for k in set(found) & set(wanted) if found[k] != wanted[k])
        raise ValueError(f"{where}: the params do not fit the config (missing {missing[:3]}, unexpected "
                         f"{extra[:3]}, wrong shapes {wrong[:3]})")


def load_cases(path) -> tuple[Case, ...]:
    """Read cases written by export (path: the folder or its manifest.json).

    Raises ValueError naming the file for a newer format version, a missing file, an unreadable or
    truncated array, or arrays that do not match the manifest (names, shapes, dtypes, sha256).
    """
    manifest_path, manifest = _read_manifest(path)
    return tuple(_load_case(manifest_path.parent, entry) for entry in manifest["cases"])



# ---------------------------------------------------------------------------------------------------
# integrity: is a case folder exactly what this kto_np exports?


@functools.lru_cache(maxsize=1)
def _installed_entries() -> dict[str, dict]:
    entries = {}
    for case in generate_cases():
        arrays = _case_arrays(case)
        entries[case.name] = _manifest_entry(case, arrays, hashlib.sha256(_npz_bytes(arrays)).hexdigest())
    return entries


def _names(items, limit: int = 6, first: str = "") -> str:
    items = sorted(items, key=lambda n: (not n.startswith(first), n)) if first else sorted(items)
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def compare_with_installed(path, first: str = "") -> tuple[bool, str]:
    """(identical, one line): whether the case folder is exactly what this kto_np's export writes, or what
    differs (entries removed or added, fields edited, content changed); names starting with `first` (the
    kind/variant being checked) are listed first."""
    manifest_path, manifest = _read_manifest(path)
    ours = _installed_entries()
    theirs = {e.get("name"): e for e in manifest["cases"] if isinstance(e, dict)}
    problems = []
    exporter = manifest.get("kto_np_version")
    if manifest.get("format_version") != FORMAT_VERSION:
        problems.append(f"format version {manifest.get('format_version')} (this kto_np writes {FORMAT_VERSION})")
    removed, added = set(ours) - set(theirs), set(theirs) - set(ours)
    if removed:
        problems.append(f"missing from the manifest: {_names(removed, first=first)}")
    if added:
        problems.append(f"not kto_np's: {_names(str(n) for n in added)}")
    edited = []
    for name in sorted(set(ours) & set(theirs), key=lambda n: (not n.startswith(first), n) if first else n):
        fields = sorted(k for k in set(ours[name]) | set(theirs[name]) if ours[name].get(k) != theirs[name].get(k))
        if fields:
            what = ", ".join("content" if f == "sha256" else f for f in fields)
            edited.append(f"{name} ({what})")
    if edited:
        problems.append(f"edited: {'; '.join(edited[:6])}" + (f" and {len(edited) - 6} more" if len(edited) > 6
                                                               else ""))
    if not problems:
        return True, f"verified identical to kto_np {__version__}'s"
    origin = f" (exported by kto_np {exporter})" if exporter != __version__ else ""
    return False, f"DIFFER from kto_np {__version__}'s export{origin}: " + "; ".join(problems)
