"""Checkpoints (one .npz file: parameters, config, optimizer and RNG state), the GPT-2 mapping, and (at
the end) Axon's parameter layout and safetensors files (kto_np.safetensors, re-exported here).

A checkpoint is a zip of .npy entries, readable by `numpy.load(path, allow_pickle=False)`:

    __kto_np_format__   int64 scalar, the format version (FORMAT_VERSION)
    __config_json__     str scalar, GPTConfig.to_dict() as JSON
    <parameter name>    every parameter under its own name: "wte.weight", "h.0.attn.c_attn.weight", ...
    extra/<key path>    each array of `extra` under its dict keys joined by "/", e.g.
                        "extra/adamw/m/wte.weight" for extra["adamw"]["m"]["wte.weight"]
    __extra_json__      str scalar, only when `extra` was given: a flat JSON object holding each
                        other value of `extra` under its key path, e.g. {"step": 17, "adamw/step": 17}

Format version 2 (flat extra keys); version 1 wrote the extra state as nested JSON with array
markers: a version-1 file loads only when it has no extra state.

Files are written atomically (temporary file in the same folder, fsync, os.replace) and with fixed zip
timestamps, so the same state always gives the same bytes. Nothing is pickled.
"""

from __future__ import annotations

import json
import numbers
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from . import backend
from .architectures import check_params, config_from_dict, param_shapes
from .backend import to_numpy
from .edifice import EdificeConfig
from .files import ArchiveError, NpzArchive, atomic_write, write_npy_entry
from .model import MAX_SIZES, GPTConfig
from .validation import check_positive_int, reject_autograd

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "SafetensorsError",
    "load",
    "load_safetensors",
    "params_from_axon",
    "params_from_hf_gpt2",
    "params_to_axon",
    "params_to_hf_gpt2",
    "save",
    "save_safetensors",
]

FORMAT_VERSION = 2
FORMAT_KEY = "__kto_np_format__"
CONFIG_KEY = "__config_json__"
EXTRA_JSON_KEY = "__extra_json__"
EXTRA_PREFIX = "extra/"

HF_PREFIX = "transformer."
HF_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers, not parameters
HF_LAYER = re.compile(r"^h\.(\d+)\.")


class Checkpoint(NamedTuple):
    """What `load` returns. params: name -> array (selected backend); extra: {} when none was saved."""

    params: dict
    config: GPTConfig
    extra: dict


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: missing, truncated, corrupt, foreign or too new."""


# ----------------------------------------------------------------------------------------------
# extra: nested dicts <-> flat "a/b/c" keys, arrays as .npy entries and the rest as one JSON object


def _is_array(value) -> bool:
    """NumPy arrays and scalars, CuPy arrays: stored as .npy entries (a NumPy scalar comes back 0-d)."""
    if isinstance(value, (np.ndarray, np.generic)):
        return True
    return type(value).__module__.split(".")[0] == "cupy" and hasattr(value, "shape")


def _json_value(value, where: str):
    """value as JSON (None, bool, int, float, str, lists of them; tuples become lists)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(
        f"{where} must be an array, a JSON value (None, bool, int, float, str, a list of them) or a dict "
        f"of them, got {type(value).__name__} (arrays go directly under dict keys, not inside lists)"
    )


def _flatten_extra(extra: Mapping, where: str, prefix: str, arrays: dict, values: dict) -> None:
    """Each leaf of the nested dict `extra` under its key path "<prefix>a/b": arrays into `arrays`,
    the other values (and empty dicts) into `values`."""
    for key, item in extra.items():
        if not isinstance(key, str):
            raise TypeError(f"{where} keys must be str (JSON), got {type(key).__name__} {key!r}")
        item_where = f"{where}[{key!r}]"
        if key in ("", ".", "..") or "/" in key or "\\" in key:
            raise ValueError(f"{item_where}: keys must be non-empty names without '/' or '\\'")
        if isinstance(item, Mapping) and item:
            _flatten_extra(item, item_where, f"{prefix}{key}/", arrays, values)
        elif isinstance(item, Mapping):
            values[prefix + key] = {}
        elif _is_array(item):
            if np.dtype(item.dtype).hasobject:
                raise TypeError(f"{item_where} must not hold Python objects (dtype {item.dtype}): nothing is pickled")
            arrays[prefix + key] = item
        else:
            values[prefix + key] = _json_value(item, item_where)


def _unflatten_extra(path: str, leaves) -> dict:
    """The nested dict of the flat ("a/b/c", leaf) pairs `leaves`."""
    extra: dict = {}
    for name, value in leaves:
        *parents, leaf = name.split("/")
        node = extra
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf in node:
            raise CheckpointError(f"checkpoint {path!r}: the extra entry {name!r} clashes with another one")
        node[leaf] = value
    return extra


# ----------------------------------------------------------------------------------------------
# save / load


def _write_entry(archive: zipfile.ZipFile, key: str, value) -> None:
    host = to_numpy(value)
    if host.dtype.hasobject:
        raise TypeError(
            f"checkpoint entry {key!r} holds Python objects (dtype {host.dtype}): nothing is pickled"
        )
    write_npy_entry(archive, key, host)


def save(path, params: dict, config: GPTConfig | EdificeConfig, *, extra: dict | None = None) -> None:
    """Write params, config and optional extra state to one .npz file at `path`, atomically.

    params: name -> array (NumPy or CuPy), exactly the keys and shapes of param_shapes(config), in
        the config's dtype. extra: a dict whose values are arrays, JSON values (None, bool, int,
        float, str, lists of them; tuples become lists) or dicts of the same, keys str without '/':
        optimizer state, step counter, RNG state (`rng.bit_generator.state`), metrics. It loads as an
        equal dict (NumPy scalars come back as 0-d arrays, key order aside). Missing parent folders are
        created. On any failure the temporary file is removed and an existing file at `path` is
        left as it was.
    """
    path = os.fspath(path)
    if not isinstance(config, (GPTConfig, EdificeConfig)):
        raise TypeError(f"config must be a GPTConfig or an EdificeConfig, got {type(config).__name__}")
    check_params(params, config)
    for name, value in params.items():
        reject_autograd(f"params[{name!r}]", value)
        dtype = getattr(value, "dtype", None)
        if dtype is None:
            raise TypeError(f"params[{name!r}] must be an array, got {type(value).__name__}")
        if np.dtype(dtype) != config.np_dtype:
            raise ValueError(f"params[{name!r}] must have the config's dtype {config.dtype}, got {dtype}")
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    extra_arrays: dict[str, Any] = {}
    extra_values: dict[str, Any] = {}
    if extra is not None:
        _flatten_extra(extra, "extra", "", extra_arrays, extra_values)
    if os.path.isdir(path):
        raise ValueError(f"path must be a file name, got the directory {path!r}")

    with atomic_write(path, "wb") as file:
        with zipfile.ZipFile(file, "w", allowZip64=True) as archive:
            _write_entry(archive, FORMAT_KEY, np.array(FORMAT_VERSION, dtype=np.int64))
            _write_entry(archive, CONFIG_KEY, np.array(json.dumps(config.to_dict())))
            for name in param_shapes(config):
                _write_entry(archive, name, params[name])
            if extra is not None:
                _write_entry(archive, EXTRA_JSON_KEY, np.array(json.dumps(extra_values)))
                for name, value in extra_arrays.items():
                    _write_entry(archive, EXTRA_PREFIX + name, value)


MAX_METADATA_BYTES = 1 << 20  # the format and config entries
MAX_EXTRA_JSON_BYTES = 1 << 26  # the extra state's JSON (64 MiB)
EXTRA_ARRAY_ALLOWANCE = 1 << 24  # extra arrays may hold 3x the parameters' bytes (AdamW's m and v) + 16 MiB


def _metadata(path: str, npz: NpzArchive, key: str, kinds: str, max_bytes: int):
    """A 0-d metadata entry (the format version, a JSON text), read only after its header says it is
    a small scalar of the right kind."""
    header = npz.headers[key]
    if header.shape != () or header.dtype.kind not in kinds:
        raise CheckpointError(f"checkpoint {path!r}: entry {key!r} must be a scalar of kind {kinds!r}, got "
                              f"shape {header.shape} and dtype {header.dtype}")
    return npz.read(key, max_bytes=max_bytes)


def _json_metadata(path: str, npz: NpzArchive, key: str, max_bytes: int):
    value = _metadata(path, npz, key, "U", max_bytes)
    try:
        return json.loads(str(value[()]))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"checkpoint {path!r}: entry {key!r} is not valid JSON ({exc})") from exc


def load(path) -> Checkpoint:
    """Read a checkpoint written by `save`. Arrays come back in the selected backend, bit for bit.

    Raises CheckpointError (a ValueError naming the path) for a missing file, a file that is not a
    kto_np checkpoint, a truncated or corrupt file, a newer format version, or parameters that do
    not match the stored config (every missing, unexpected and mis-shaped key is listed).

    The work is bounded by what the config describes: the zip directory and every entry's .npy header
    are read first; the config (within model.MAX_SIZES / MAX_PARAMETERS), the entries' names, count,
    shapes and dtypes are checked against each other before any array is read; each entry then
    decompresses exactly the bytes its header declares (files.NpzArchive).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} is not a file")
    try:
        with open(path, "rb") as file, NpzArchive(file, name=path) as npz:
            return _load(path, npz)
    except ArchiveError as exc:
        raise CheckpointError(f"cannot read checkpoint {path!r}: the file is truncated, corrupt or not a kto_np "
                              f"checkpoint ({exc})") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {exc.strerror or exc}") from exc


def _load(path: str, npz: NpzArchive) -> Checkpoint:
    headers = npz.headers
    if FORMAT_KEY not in headers:
        raise CheckpointError(f"{path!r} is not a kto_np checkpoint: it has no {FORMAT_KEY!r} entry")
    version = int(_metadata(path, npz, FORMAT_KEY, "iu", MAX_METADATA_BYTES))
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path!r} has format version {version}, newer than this kto_np reads "
            f"({FORMAT_VERSION}): upgrade kto_np"
        )
    if version < 1:
        raise CheckpointError(f"checkpoint {path!r} has an invalid format version {version}")
    if version < FORMAT_VERSION and EXTRA_JSON_KEY in headers:
        raise CheckpointError(
            f"checkpoint {path!r} has format version {version}, whose extra state (nested JSON) this "
            f"kto_np (format {FORMAT_VERSION}, flat keys) does not read: only its parameters would load"
        )
    if CONFIG_KEY not in headers:
        raise CheckpointError(f"checkpoint {path!r} has no {CONFIG_KEY!r} entry")
    config_dict = _json_metadata(path, npz, CONFIG_KEY, MAX_METADATA_BYTES)
    try:
        if not isinstance(config_dict, dict):
            raise ValueError(f"expected a JSON object, got {type(config_dict).__name__}")
        config = config_from_dict(config_dict)  # GPT sizes within model.MAX_SIZES and MAX_PARAMETERS
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path!r} holds an invalid config: {exc}") from exc
    too_large = [f"{name}={getattr(config, name)} (at most {limit})" for name, limit in MAX_SIZES.items()
                 if isinstance(getattr(config, name, None), int) and getattr(config, name) > limit]
    if too_large:  # (GPTConfig checks this itself; the same bounds for every architecture)
        raise CheckpointError(f"checkpoint {path!r} holds an invalid config: {', '.join(too_large)}")

    reserved = {FORMAT_KEY, CONFIG_KEY, EXTRA_JSON_KEY}
    unknown_meta = [k for k in headers if k.startswith("__") and k not in reserved]
    if unknown_meta:
        raise CheckpointError(f"checkpoint {path!r} has unknown metadata entries {unknown_meta}")
    stored = [k for k in headers if k not in reserved and not k.startswith(EXTRA_PREFIX)]
    shapes = param_shapes(config)  # cheap: the config's sizes are bounded
    try:  # names and shapes from the headers: no array has been read
        check_params({k: headers[k] for k in stored}, config, name="stored parameters")
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path!r}: {exc}") from exc
    wrong_dtype = [f"{k}: {headers[k].dtype}" for k in stored if headers[k].dtype != config.np_dtype]
    if wrong_dtype:
        raise CheckpointError(
            f"checkpoint {path!r}: parameters must have the config's dtype {config.dtype}, got {wrong_dtype[:20]}"
        )
    param_bytes = sum(headers[k].nbytes for k in stored)
    extra_keys = [k for k in headers if k.startswith(EXTRA_PREFIX)]
    extra_bytes = sum(headers[k].nbytes for k in extra_keys)
    if extra_bytes > 3 * param_bytes + EXTRA_ARRAY_ALLOWANCE:
        raise CheckpointError(f"checkpoint {path!r}: its extra arrays declare {extra_bytes:,} bytes, more than "
                              f"3 x the parameters' {param_bytes:,} bytes + {EXTRA_ARRAY_ALLOWANCE:,}")

    xp = backend.xp()
    extra_values = _json_metadata(path, npz, EXTRA_JSON_KEY, MAX_EXTRA_JSON_BYTES) if EXTRA_JSON_KEY in headers else {}
    if not isinstance(extra_values, dict):
        raise CheckpointError(f"checkpoint {path!r}: {EXTRA_JSON_KEY!r} must be a JSON object")
    extra_arrays = {k[len(EXTRA_PREFIX):]: xp.asarray(npz.read(k)) for k in extra_keys}
    extra = _unflatten_extra(path, [*extra_values.items(), *extra_arrays.items()])
    params = {name: xp.asarray(npz.read(name)) for name in shapes}
    return Checkpoint(params=params, config=config, extra=extra)


# ----------------------------------------------------------------------------------------------
# Hugging Face GPT-2 state dicts


def _hf_to_numpy(key: str, value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        try:
            return value.detach().cpu().numpy()
        except (TypeError, RuntimeError) as exc:
            raise TypeError(
                f"state_dict[{key!r}] cannot be converted to NumPy ({exc}); convert it with .float() first"
            ) from exc
    return to_numpy(value)


def params_from_hf_gpt2(state_dict, *, num_heads: int, config_overrides: dict | None = None):
    """Our params and GPTConfig from a Hugging Face GPT-2 state dict. Returns (params, config).

    state_dict: name -> array (NumPy, CuPy or torch tensor), names with or without "transformer.";
    the causal-mask buffers h.{i}.attn.bias / h.{i}.attn.masked_bias are ignored. vocab_size and
    hidden_size come from wte.weight [V, C], max_seq_len from wpe.weight [T, C] (when wpe is absent,
    positions are sinusoidal and config_overrides must give max_seq_len), num_layers from the h.{i}
    blocks. lm_head.weight absent or equal to wte.weight → tied; different → untied. num_heads cannot
    be inferred. config_overrides sets any other GPTConfig field (dropout, dtype, tie_embeddings=False
    to untie a tied model); a dtype override converts the tensors, otherwise they must all be float32
    or all float64. Arrays are copied into the selected backend.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to arrays, got {type(state_dict).__name__}")
    num_heads = check_positive_int("num_heads", num_heads)
    if config_overrides is None:
        config_overrides = {}
    if not isinstance(config_overrides, Mapping):
        raise TypeError(f"config_overrides must be a dict or None, got {type(config_overrides).__name__}")
    unknown = sorted(set(config_overrides) - set(GPTConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(
            f"config_overrides has unknown keys {unknown}; GPTConfig fields are "
            f"{sorted(GPTConfig.__dataclass_fields__)}"
        )
    if "num_heads" in config_overrides:
        raise ValueError("config_overrides must not set num_heads: pass it as the num_heads argument")

    tensors: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be str, got {type(key).__name__} {key!r}")
        name = key[len(HF_PREFIX):] if key.startswith(HF_PREFIX) else key
        if HF_BUFFER.match(name):
            continue
        if name in tensors:
            raise ValueError(f"state_dict has {name!r} both with and without the {HF_PREFIX!r} prefix")
        tensors[name] = _hf_to_numpy(key, value)

    wte = tensors.get("wte.weight")
    if wte is None:
        raise ValueError("state_dict must contain 'wte.weight' (or 'transformer.wte.weight'), got none")
    if wte.ndim != 2:
        raise ValueError(f"state_dict['wte.weight'] must be 2-D [V, C], got shape {wte.shape}")
    layer_ids = sorted({int(m.group(1)) for name in tensors if (m := HF_LAYER.match(name))})
    if not layer_ids or layer_ids != list(range(len(layer_ids))):
        raise ValueError(f"state_dict must hold blocks h.0 ... h.{{L-1}}, got block numbers {layer_ids}")
    inferred: dict[str, Any] = {
        "vocab_size": int(wte.shape[0]),
        "hidden_size": int(wte.shape[1]),
        "num_layers": len(layer_ids),
        "num_heads": num_heads,
    }
    wpe = tensors.get("wpe.weight")
    if wpe is not None:
        if wpe.ndim != 2:
            raise ValueError(f"state_dict['wpe.weight'] must be 2-D [T, C], got shape {wpe.shape}")
        inferred["positional"] = "learned"
        inferred["max_seq_len"] = int(wpe.shape[0])
    else:
        inferred["positional"] = "sinusoidal"
        if "max_seq_len" not in config_overrides:
            raise ValueError(
                "state_dict has no 'wpe.weight', so max_seq_len cannot be inferred: "
                "pass config_overrides={'max_seq_len': ...}"
            )
    lm_head = tensors.get("lm_head.weight")
    tied_in_file = lm_head is None or (lm_head.shape == wte.shape and bool(np.array_equal(lm_head, wte)))
    inferred["tie_embeddings"] = tied_in_file
    if "dtype" not in config_overrides:
        dtypes = sorted({str(t.dtype) for t in tensors.values()})
        if len(dtypes) != 1 or dtypes[0] not in ("float32", "float64"):
            raise ValueError(
                f"state_dict tensors must all be float32 or all float64, got dtypes {dtypes}; pass "
                "config_overrides={'dtype': 'float32'} (or 'float64') to convert them"
            )
        inferred["dtype"] = dtypes[0]

    try:
        config = GPTConfig.from_dict({**inferred, **config_overrides})
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"state_dict and config_overrides do not make a valid GPTConfig: {exc}") from exc
    if config.tie_embeddings:
        if not tied_in_file:
            raise ValueError(
                "config_overrides sets tie_embeddings=True but state_dict's lm_head.weight differs "
                "from wte.weight"
            )
        tensors.pop("lm_head.weight", None)
    elif "lm_head.weight" not in tensors:  # untying a tied file: the head starts as a copy of wte
        tensors["lm_head.weight"] = wte.copy()
    check_params(tensors, config, name="state_dict tensors (names without 'transformer.')")
    xp = backend.xp()
    params = {
        name: xp.asarray(np.array(tensors[name], dtype=config.np_dtype, copy=True))
        for name in param_shapes(config)
    }
    return params, config


def params_to_hf_gpt2(params: dict, config: GPTConfig) -> dict[str, np.ndarray]:
    """A Hugging Face GPT2LMHeadModel state dict (NumPy copies) from our params.

    Names get the "transformer." prefix; "lm_head.weight" [V, C] is a copy of wte.weight when the
    embeddings are tied. The causal-mask buffers are not included (load with strict=False on old
    transformers versions); a sinusoidal-position model has no wpe.weight, which GPT-2 itself needs.
    Use torch.from_numpy on each value to load it into a torch model.
    """
    if not isinstance(config, GPTConfig):
        raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
    check_params(params, config)
    state_dict = {}
    for name in param_shapes(config):
        hf_name = name if name == "lm_head.weight" else HF_PREFIX + name
        state_dict[hf_name] = np.array(to_numpy(params[name]), copy=True)
    if config.tie_embeddings:
        state_dict["lm_head.weight"] = state_dict[HF_PREFIX + "wte.weight"].copy()
    return state_dict


# ----------------------------------------------------------------------------------------------
# Axon (Edifice) parameters and safetensors files

from .safetensors import SafetensorsError, load_safetensors, save_safetensors  # noqa: E402  (re-exported)

AXON_BLOCK = re.compile(r"^block_(\d+)_")


def _axon_flat(params_or_nested, where: str) -> dict[str, np.ndarray]:
    """{"layer.param": array} from Axon's nested {layer: {param: array}} or from that flat layout."""
    if not isinstance(params_or_nested, Mapping) or not params_or_nested:
        raise TypeError(f"{where} must be a non-empty mapping {{layer: {{param: array}}}} (or "
                        f"{{'layer.param': array}}), got {type(params_or_nested).__name__}")
    flat: dict[str, np.ndarray] = {}
    for layer, value in params_or_nested.items():
        if not isinstance(layer, str) or not layer:
            raise TypeError(f"{where} keys must be non-empty str layer names, got {layer!r}")
        if isinstance(value, Mapping):
            for param, array in value.items():
                if not isinstance(param, str) or not param or "." in param:
                    raise ValueError(f"{where}[{layer!r}] keys must be parameter names without '.', got {param!r}")
                flat[f"{layer}.{param}"] = _hf_to_numpy(f"{layer}.{param}", array)
        elif "." in layer and getattr(value, "shape", None) is not None:
            flat[layer] = _hf_to_numpy(layer, value)
        else:
            raise TypeError(f"{where}[{layer!r}] must be a mapping {{param: array}} (nested) or, under a "
                            f"'layer.param' key, an array; got {type(value).__name__}")
    return flat


def params_from_axon(nested, *, num_heads: int, config_overrides: dict | None = None):
    """Our Edifice params and EdificeConfig from Axon's parameters. Returns (params, config).

    nested: {layer: {param: array}} as Axon's model state holds them ("block_1_attn_q": {"kernel",
    "bias"}, "final_norm": {"gamma", "beta"}, ...), or the same flattened to {"layer.param": array}
    (what load_safetensors returns for a file written from them). hidden_size comes from
    final_norm.gamma, vocab_size from lm_head.kernel [H, V], num_layers from the block_{i} layers,
    token_embedding from whether a "token_embed" layer is present; num_heads cannot be inferred.
    config_overrides sets any other EdificeConfig field (max_seq_len, dropout, dtype; otherwise
    Edifice's defaults 2048 and 0.1, and the arrays' dtype, which must be all float32 or all float64).
    """
    from .edifice import Edifice  # noqa: PLC0415

    num_heads = check_positive_int("num_heads", num_heads)
    config_overrides = {} if config_overrides is None else config_overrides
    if not isinstance(config_overrides, Mapping):
        raise TypeError(f"config_overrides must be a dict or None, got {type(config_overrides).__name__}")
    unknown = sorted(set(config_overrides) - set(EdificeConfig.__dataclass_fields__))
    if unknown or "num_heads" in config_overrides:
        raise ValueError(f"config_overrides has keys {unknown or ['num_heads']} that are not settable; "
                         f"settable: {sorted(set(EdificeConfig.__dataclass_fields__) - {'num_heads'})}")
    tensors = _axon_flat(nested, "nested")
    for name in ("final_norm.gamma", "lm_head.kernel"):
        if name not in tensors:
            raise ValueError(f"nested must contain {name!r} (Edifice's {name.split('.')[0]} layer), got none")
    gamma, head = tensors["final_norm.gamma"], tensors["lm_head.kernel"]
    if gamma.ndim != 1 or head.ndim != 2 or head.shape[0] != gamma.shape[0]:
        raise ValueError(f"final_norm.gamma must be [H] and lm_head.kernel [H, V], got shapes {gamma.shape} "
                         f"and {head.shape}")
    layers = sorted({int(m.group(1)) for name in tensors if (m := AXON_BLOCK.match(name))})
    if not layers or layers != list(range(1, len(layers) + 1)):
        raise ValueError(f"nested must hold layers block_1_* ... block_L_*, got block numbers {layers}")
    inferred = {"hidden_size": int(gamma.shape[0]), "vocab_size": int(head.shape[1]), "num_layers": len(layers),
                "num_heads": num_heads,
                "token_embedding": "learned" if "token_embed.kernel" in tensors else "fixed"}
    if "dtype" not in config_overrides:
        dtypes = sorted({str(t.dtype) for t in tensors.values()})
        if len(dtypes) != 1 or dtypes[0] not in ("float32", "float64"):
            raise ValueError(f"the arrays must all be float32 or all float64, got dtypes {dtypes}; pass "
                             "config_overrides={'dtype': 'float32'} (or 'float64') to convert them")
        inferred["dtype"] = dtypes[0]
    try:
        config = EdificeConfig(**{**inferred, **config_overrides})
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"nested and config_overrides do not make a valid EdificeConfig: {exc}") from exc
    model = Edifice(config)
    check_params(tensors, config, name="nested parameters (as 'layer.param')")
    xp = backend.xp()
    params = {name: xp.asarray(np.array(tensors[name], dtype=config.np_dtype, copy=True))
              for name in param_shapes(config)}
    model.check_params(params)
    return params, config


def params_to_axon(params: dict, config: EdificeConfig | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Axon's nested {layer: {param: array}} (NumPy copies) from our "layer.param" params.

    With config given, params are first checked against it (names, shapes). Save the flat params with
    save_safetensors for Elixir's `safetensors` library, then nest them again on the Elixir side.
    """
    if config is not None:
        if not isinstance(config, EdificeConfig):
            raise TypeError(f"config must be an EdificeConfig, got {type(config).__name__}")
        check_params(params, config)
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of 'layer.param' -> array, got {type(params).__name__}")
    nested: dict[str, dict[str, np.ndarray]] = {}
    for name, value in params.items():
        if not isinstance(name, str) or name.count(".") != 1 or name.startswith(".") or name.endswith("."):
            raise ValueError(f"params keys must be 'layer.param' (one '.'), got {name!r}")
        layer, param = name.split(".")
        nested.setdefault(layer, {})[param] = np.array(to_numpy(value), copy=True)
    return nested
