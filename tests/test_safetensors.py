"""safetensors in NumPy (kto_np.safetensors, re-exported by kto_np.checkpoint): round trips, files built
byte by byte here, the `safetensors` package and Hugging Face's save_pretrained where installed, Axon
parameters, and every kind of bad file."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

import kto_np
from kto_np import checkpoint
from kto_np.checkpoint import (
    SafetensorsError,
    load_safetensors,
    params_from_axon,
    params_from_hf_gpt2,
    params_to_axon,
    params_to_hf_gpt2,
    save_safetensors,
)


def file_bytes(header: dict, data: bytes, *, pad: bool = False) -> bytes:
    """A safetensors file assembled here: 8-byte little-endian length, JSON, data."""
    text = json.dumps(header).encode("utf-8")
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def write(tmp_path, content: bytes, name: str = "f.safetensors"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


# ---------------------------------------------------------------------------------------------------
# reading and writing


def test_round_trip_every_dtype_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "f64": rng.standard_normal((2, 3)),
        "f32": rng.standard_normal((4,)).astype(np.float32),
        "f16": rng.standard_normal((3, 1)).astype(np.float16),
        "i64": np.array([[-(2**62), 2**62]], dtype=np.int64),
        "i32": np.arange(6, dtype=np.int32).reshape(2, 3) - 3,
        "i16": np.array([-3, 7], dtype=np.int16),
        "i8": np.array([-128, 127], dtype=np.int8),
        "u8": np.array([0, 255], dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(2.5),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "big_endian": np.array([1.5, -2.0], dtype=">f8"),
        "strided": np.arange(12.0).reshape(3, 4)[:, ::2],
    }
    path = tmp_path / "all.safetensors"
    save_safetensors(path, arrays, metadata={"format": "np", "note": "é"})
    loaded, metadata = load_safetensors(path, with_metadata=True)
    assert metadata == {"format": "np", "note": "é"}
    assert list(loaded) == sorted(arrays)
    for name, value in arrays.items():
        assert loaded[name].shape == value.shape and np.array_equal(loaded[name], value), name
        assert loaded[name].dtype == value.dtype.newbyteorder("=") or loaded[name].dtype == value.dtype, name
    raw = path.read_bytes()
    header_size = struct.unpack("<Q", raw[:8])[0]
    assert header_size % 8 == 0  # padded with spaces so the data start 8-byte aligned
    header = json.loads(raw[8:8 + header_size])
    assert header["f64"]["dtype"] == "F64" and header["bool"]["dtype"] == "BOOL"
    begin, end = header["big_endian"]["data_offsets"]
    assert raw[8 + header_size + begin:8 + header_size + end] == struct.pack("<2d", 1.5, -2.0)  # little-endian
    assert checkpoint.load_safetensors is load_safetensors  # re-exported


def test_same_arrays_same_bytes(tmp_path):
    arrays = {"b": np.arange(3.0), "a": np.ones((2, 2), dtype=np.float32)}
    save_safetensors(tmp_path / "1.safetensors", arrays)
    save_safetensors(tmp_path / "2.safetensors", dict(reversed(list(arrays.items()))))
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()


def test_reads_a_file_built_byte_by_byte_with_bf16_and_no_padding(tmp_path):
    """Elixir's safetensors library writes no padding and sorts tensors by name."""
    bf16_values = np.array([1.0, -2.5, 3.140625], dtype=np.float32)  # exactly representable in bfloat16
    bf16_bits = (bf16_values.view(np.uint32) >> 16).astype("<u2").tobytes()
    f32 = struct.pack("<3f", 0.5, 1.5, -4.0)
    i64 = struct.pack("<2q", -7, 9)
    header = {
        "a_bf16": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]},
        "b_f32": {"dtype": "F32", "shape": [1, 3], "data_offsets": [6, 18]},
        "c_i64": {"dtype": "I64", "shape": [2], "data_offsets": [18, 34]},
    }
    content = file_bytes(header, bf16_bits + f32 + i64)
    assert (len(content) - 8 - 34) % 8 != 0  # unaligned on purpose
    loaded = load_safetensors(write(tmp_path, content))
    assert loaded["a_bf16"].dtype == np.float32 and np.array_equal(loaded["a_bf16"], bf16_values)
    assert np.array_equal(loaded["b_f32"], [[0.5, 1.5, -4.0]]) and np.array_equal(loaded["c_i64"], [-7, 9])
    assert load_safetensors(write(tmp_path, file_bytes(header, bf16_bits + f32 + i64)), with_metadata=True)[1] is None


def test_cross_check_with_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy", reason="safetensors not installed (pip install safetensors)")
    rng = np.random.default_rng(1)
    arrays = {"w": rng.standard_normal((3, 4)).astype(np.float32), "x": rng.standard_normal(5),
              "n": np.arange(4, dtype=np.int64), "h": rng.standard_normal(2).astype(np.float16)}
    save_safetensors(tmp_path / "ours.safetensors", arrays, metadata={"k": "v"})
    theirs = st.load_file(str(tmp_path / "ours.safetensors"))
    assert set(theirs) == set(arrays) and all(np.array_equal(theirs[k], arrays[k]) for k in arrays)
    st.save_file(arrays, str(tmp_path / "theirs.safetensors"), metadata={"format": "np"})
    ours, metadata = load_safetensors(tmp_path / "theirs.safetensors", with_metadata=True)
    assert metadata == {"format": "np"} and all(np.array_equal(ours[k], arrays[k]) for k in arrays)


# ---------------------------------------------------------------------------------------------------
# Hugging Face GPT-2 files


def _tiny_gpt():
    model = kto_np.build(hidden_size=12, num_layers=2, num_heads=3, vocab_size=11, max_seq_len=8, dropout=0.0)
    params = model.init(0)
    rng = np.random.default_rng(2)
    return model, {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()}


@pytest.mark.parametrize("prefix", [True, False])
def test_hf_gpt2_layout_file_reads_into_params_from_hf_gpt2(tmp_path, prefix):
    model, params = _tiny_gpt()
    state_dict = params_to_hf_gpt2(params, model.config)
    del state_dict["lm_head.weight"]  # save_pretrained leaves the tied head out
    if not prefix:
        state_dict = {k.removeprefix("transformer."): v for k, v in state_dict.items()}
    save_safetensors(tmp_path / "model.safetensors", state_dict, metadata={"format": "pt"})
    loaded_params, config = params_from_hf_gpt2(load_safetensors(tmp_path / "model.safetensors"), num_heads=3,
                                                config_overrides={"dropout": 0.0})
    assert config == model.config
    tokens = np.array([[1, 2, 3, 4, 5]])
    assert np.array_equal(kto_np.GPT(config).forward(loaded_params, tokens)[0], model.forward(params, tokens)[0])


@pytest.mark.slow  # importing transformers takes ~15 s
def test_reads_save_pretrained_of_transformers(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed")
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    config = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=12, n_layer=2, n_head=3,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    state = load_safetensors(tmp_path / "hf" / "model.safetensors")
    assert "lm_head.weight" not in state and "transformer.wte.weight" in state
    params, ours = params_from_hf_gpt2(state, num_heads=3, config_overrides={"dropout": 0.0})
    tokens = np.array([[1, 4, 2, 7, 3]])
    with torch.no_grad():
        expected = hf_model(torch.tensor(tokens)).logits.numpy()
    logits = kto_np.GPT(ours).forward(params, tokens)[0]
    assert np.max(np.abs(logits - expected)) <= 1e-5 * max(1.0, np.max(np.abs(expected)))


# ---------------------------------------------------------------------------------------------------
# Axon parameters


def _edifice(token_embedding="fixed"):
    model = kto_np.build(architecture="edifice", vocab_size=9, hidden_size=8, num_heads=2, num_layers=2,
                         max_seq_len=6, dropout=0.0, dtype="float32", token_embedding=token_embedding)
    return model, model.init(1)


@pytest.mark.parametrize("token_embedding", ["fixed", "learned"])
def test_axon_nested_round_trip_and_a_file_written_elixir_style(tmp_path, token_embedding):
    model, params = _edifice(token_embedding)
    nested = params_to_axon(params, model.config)
    assert set(nested["block_1_attn_q"]) == {"kernel", "bias"} and set(nested["final_norm"]) == {"gamma", "beta"}
    assert nested["lm_head"]["kernel"].shape == (8, 9)
    back, config = params_from_axon(nested, num_heads=2, config_overrides={"max_seq_len": 6, "dropout": 0.0})
    assert config == model.config and all(np.array_equal(back[k], params[k]) for k in params)
    # Elixir's safetensors library: flat "layer.param" names, sorted, no header padding
    names = sorted(params)
    header, data, offset = {}, b"", 0
    for name in names:
        raw = np.ascontiguousarray(params[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(params[name].shape), "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    flat = load_safetensors(write(tmp_path, file_bytes(header, data)))
    back, config = params_from_axon(flat, num_heads=2, config_overrides={"max_seq_len": 6, "dropout": 0.0})
    tokens = np.array([[1, 2, 3]])
    assert np.array_equal(model.forward(back, tokens)[0], model.forward(params, tokens)[0])


def test_axon_bad_input():
    model, params = _edifice()
    nested = params_to_axon(params)
    with pytest.raises(ValueError, match="final_norm.gamma"):
        params_from_axon({k: v for k, v in nested.items() if k != "final_norm"}, num_heads=2)
    with pytest.raises(ValueError, match="wrong shapes"):
        params_from_axon({**nested, "block_1_attn_q": {"kernel": np.zeros((8, 7), np.float32),
                                                       "bias": np.zeros(8, np.float32)}}, num_heads=2)
    with pytest.raises(ValueError, match="unexpected keys"):
        params_from_axon({**nested, "pos_embed": {"table": np.zeros(3, np.float32)}}, num_heads=2)
    with pytest.raises(ValueError, match="block numbers"):
        params_from_axon({k: v for k, v in nested.items() if not k.startswith("block_1_")}, num_heads=2)
    with pytest.raises(ValueError, match="float32 or all float64"):
        params_from_axon({**nested, "lm_head": {"kernel": nested["lm_head"]["kernel"].astype(np.float64),
                                                "bias": nested["lm_head"]["bias"]}}, num_heads=2)
    with pytest.raises(ValueError, match="num_heads"):
        params_from_axon(nested, num_heads=2, config_overrides={"num_heads": 4})
    with pytest.raises(ValueError, match="divisible"):
        params_from_axon(nested, num_heads=3)
    with pytest.raises(TypeError, match="mapping"):
        params_from_axon([1, 2], num_heads=2)
    with pytest.raises(TypeError, match="mapping"):
        params_from_axon({"final_norm": 3}, num_heads=2)
    with pytest.raises(ValueError, match="layer.param"):
        params_to_axon({"no_dot": np.zeros(2)})


# ---------------------------------------------------------------------------------------------------
# bad files


GOOD_HEADER = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
GOOD_DATA = struct.pack("<2f", 1.0, 2.0)


@pytest.mark.parametrize(("content", "message"), [
    (b"\x01\x02", "fewer than the 8"),
    (struct.pack("<Q", 10**12) + b"{}", "exceeds the 104857600-byte limit"),
    (struct.pack("<Q", 50) + b"{}", "exceeds the 2 bytes after it"),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", "not UTF-8"),
    (struct.pack("<Q", 3) + b"{x}", "not valid JSON"),
    (struct.pack("<Q", 2) + b"[]", "must be a JSON object"),
    (file_bytes(GOOD_HEADER, GOOD_DATA[:5]), "outside the 5-byte data buffer"),
    (file_bytes({"x": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0"), "unsupported dtype"),
    (file_bytes({"x": {"dtype": "Q99", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0"), "unsupported dtype"),
    (file_bytes({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, GOOD_DATA), "invalid shape"),
    (file_bytes({"x": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, GOOD_DATA), "invalid shape"),
    (file_bytes({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, GOOD_DATA), "invalid data_offsets"),
    (file_bytes({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, GOOD_DATA), "outside"),
    (file_bytes({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 2**70]}}, GOOD_DATA), "outside"),
    (file_bytes({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, GOOD_DATA), "needs 12 bytes"),
    (file_bytes({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, GOOD_DATA), "overlaps"),
    (file_bytes({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, GOOD_DATA), "belong to no tensor"),
    (file_bytes({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, GOOD_DATA), "the tensors cover 4"),
    (file_bytes({"x": {"dtype": "F32", "shape": [2]}}, GOOD_DATA), "exactly the keys"),
    (file_bytes({"x": [1, 2]}, GOOD_DATA), "exactly the keys"),
    (file_bytes({**GOOD_HEADER, "__metadata__": {"a": 1}}, GOOD_DATA), "__metadata__ must be an object of strings"),
    (struct.pack("<Q", 2 * len(json.dumps(GOOD_HEADER)) + 1)
     + (json.dumps(GOOD_HEADER)[:-1] + ", " + json.dumps(GOOD_HEADER)[1:]).encode() + GOOD_DATA, "duplicate keys"),
])
def test_bad_files_raise_a_named_error(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(SafetensorsError, match=message) as info:
        load_safetensors(path)
    assert isinstance(info.value, ValueError) and os.fspath(path) in str(info.value)


def test_truncated_files_at_every_length(tmp_path):
    save_safetensors(tmp_path / "good.safetensors", {"a": np.arange(5.0), "b": np.ones((2, 2), np.float32)})
    content = (tmp_path / "good.safetensors").read_bytes()
    for cut in range(len(content)):
        with pytest.raises(SafetensorsError):
            load_safetensors(write(tmp_path, content[:cut], "cut.safetensors"))
    assert load_safetensors(write(tmp_path, content, "whole.safetensors"))["a"].tolist() == [0, 1, 2, 3, 4]


def test_missing_file_and_bad_writes(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(TypeError, match="str to str"):
        save_safetensors(tmp_path / "m.safetensors", {"a": np.zeros(1)}, metadata={"a": 1})
    with pytest.raises(ValueError, match="reserved"):
        save_safetensors(tmp_path / "m.safetensors", {"__metadata__": np.zeros(1)})
    with pytest.raises(TypeError, match="dtype complex128"):
        save_safetensors(tmp_path / "m.safetensors", {"a": np.zeros(1, dtype=complex)})
    with pytest.raises(TypeError, match="non-empty str"):
        save_safetensors(tmp_path / "m.safetensors", {3: np.zeros(1)})
    with pytest.raises(TypeError, match="mapping"):
        save_safetensors(tmp_path / "m.safetensors", [np.zeros(1)])
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left
