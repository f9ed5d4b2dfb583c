"""Checkpoint files (round trip, atomic writes, clear errors) and the Hugging Face GPT-2 mapping."""

import json
import os
import time
import zipfile

import numpy as np
import pytest

from kto_np import checkpoint
from kto_np.checkpoint import CheckpointError, load, params_from_hf_gpt2, params_to_hf_gpt2, save
from kto_np.model import GPTConfig, param_shapes
from kto_np.optim import adamw_init, adamw_step

TORCH_SKIP = "torch not installed (pip install 'kto_np[torch]')"


def small_config(**overrides):
    settings = {"vocab_size": 11, "max_seq_len": 7, "hidden_size": 8, "num_layers": 2, "num_heads": 2,
                "dtype": "float64"}
    return GPTConfig(**{**settings, **overrides})


def random_params(config, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(config.np_dtype) for k, s in param_shapes(config).items()}


def assert_bit_equal(name, mine, theirs):
    mine, theirs = np.asarray(mine), np.asarray(theirs)
    assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, (
        f"{name}: {mine.dtype}{mine.shape} vs {theirs.dtype}{theirs.shape}"
    )
    assert mine.tobytes() == theirs.tobytes(), f"{name}: {mine.ravel()[:4]} vs {theirs.ravel()[:4]}"


def assert_params_bit_equal(mine, theirs):
    assert list(mine) == list(theirs)
    for name in mine:
        assert_bit_equal(name, mine[name], theirs[name])


def folder_listing(folder):
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("tie_embeddings", [True, False])
@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_round_trip_is_bit_exact(tmp_path, dtype, tie_embeddings, positional):
    config = small_config(dtype=dtype, tie_embeddings=tie_embeddings, positional=positional)
    params = random_params(config, seed=3)
    params["ln_f.bias"][:3] = [-0.0, np.finfo(config.np_dtype).tiny, np.finfo(config.np_dtype).max]
    rng = np.random.default_rng(1)
    extra = {
        "step": 17,
        "adamw": {"step": 17, "m": {"wte.weight": rng.standard_normal((2, 3)).astype(np.float32)}},
        "history": [0.5, float("inf"), None, "text", True, (1, [2])],
        "counts": np.arange(4, dtype=np.int16),
        "rng": rng.bit_generator.state,
        "scalar": np.float32(0.1),
        "nothing_yet": {},
    }
    path = tmp_path / "model.npz"
    save(path, params, config, extra=extra)
    loaded = load(path)

    assert loaded.config == config
    assert_params_bit_equal(loaded.params, params)
    assert list(loaded.params) == list(param_shapes(config))
    got = loaded.extra
    assert sorted(got) == sorted(extra)
    assert got["step"] == 17 and type(got["step"]) is int
    assert sorted(got["adamw"]) == ["m", "step"] and got["adamw"]["step"] == 17
    assert_bit_equal("adamw.m", got["adamw"]["m"]["wte.weight"], extra["adamw"]["m"]["wte.weight"])
    assert got["history"] == [0.5, float("inf"), None, "text", True, [1, [2]]]
    assert_bit_equal("counts", got["counts"], extra["counts"])
    assert got["rng"] == extra["rng"]
    assert_bit_equal("scalar", got["scalar"], np.array(np.float32(0.1)))
    assert got["nothing_yet"] == {}
    assert folder_listing(tmp_path) == ["model.npz"]


def test_rng_state_round_trip_continues_the_same_stream(tmp_path):
    config = small_config()
    rng = np.random.default_rng(2024)
    rng.standard_normal(5)
    save(tmp_path / "c.npz", random_params(config), config, extra={"rng": rng.bit_generator.state})
    expected = rng.standard_normal(6)
    restored = np.random.default_rng()
    restored.bit_generator.state = load(tmp_path / "c.npz").extra["rng"]
    np.testing.assert_array_equal(restored.standard_normal(6), expected)


def test_without_extra_load_gives_an_empty_dict_and_plain_numpy_can_read_the_file(tmp_path):
    config = small_config()
    params = random_params(config)
    save(tmp_path / "c.npz", params, config)
    assert load(tmp_path / "c.npz").extra == {}
    with np.load(tmp_path / "c.npz", allow_pickle=False) as data:
        assert int(data["__kto_np_format__"]) == 2
        assert json.loads(str(data["__config_json__"])) == config.to_dict()
        assert_bit_equal("wte.weight", data["wte.weight"], params["wte.weight"])


def test_same_state_gives_the_same_bytes(tmp_path, monkeypatch):
    config = small_config(dtype="float32")
    params = random_params(config)
    extra = {"adamw": adamw_init(params)}
    save(tmp_path / "a.npz", params, config, extra=extra)
    a_day_later = time.time() + 86400
    real_localtime = time.localtime
    monkeypatch.setattr(time, "localtime", lambda secs=None: real_localtime(a_day_later))
    save(tmp_path / "b.npz", params, config, extra=extra)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_resume_from_checkpoint_matches_uninterrupted_training(tmp_path):
    config = small_config(dtype="float32", tie_embeddings=False)

    def train(params, state, rng, steps):
        for _ in range(steps):
            grads = {k: rng.standard_normal(p.shape).astype(p.dtype) for k, p in params.items()}
            adamw_step(params, grads, state, lr=1e-2)

    straight = random_params(config, seed=5)
    straight_state, rng = adamw_init(straight), np.random.default_rng(9)
    train(straight, straight_state, rng, 6)

    resumed = random_params(config, seed=5)
    state, rng = adamw_init(resumed), np.random.default_rng(9)
    train(resumed, state, rng, 3)
    save(tmp_path / "c.npz", resumed, config, extra={"adamw": state, "rng": rng.bit_generator.state})
    del resumed, state, rng
    ckpt = load(tmp_path / "c.npz")
    rng = np.random.default_rng()
    rng.bit_generator.state = ckpt.extra["rng"]
    train(ckpt.params, ckpt.extra["adamw"], rng, 3)

    assert ckpt.extra["adamw"]["step"] == straight_state["step"] == 6
    assert_params_bit_equal(ckpt.params, straight)
    for name in straight:
        assert_bit_equal(f"m[{name}]", ckpt.extra["adamw"]["m"][name], straight_state["m"][name])
        assert_bit_equal(f"v[{name}]", ckpt.extra["adamw"]["v"][name], straight_state["v"][name])


def test_save_creates_missing_folders(tmp_path):
    config = small_config()
    save(tmp_path / "runs" / "a" / "c.npz", random_params(config), config)
    assert load(tmp_path / "runs" / "a" / "c.npz").config == config


# ---------------------------------------------------------------------------------------------
# atomic writes


class ArrayThatCannotBeConverted:
    """Passes the shape and dtype checks; fails when the writer converts it to NumPy."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype, self.ndim = shape, np.dtype(dtype), len(shape)

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("conversion failed half-way through the save")


@pytest.mark.parametrize("existing", [True, False])
def test_failed_save_leaves_the_old_file_and_no_temp_file(tmp_path, existing):
    config = small_config()
    path = tmp_path / "c.npz"
    if existing:
        save(path, random_params(config, seed=1), config, extra={"step": 1})
        old_bytes = path.read_bytes()
    bad = random_params(config, seed=2)
    bad["ln_f.bias"] = ArrayThatCannotBeConverted((config.hidden_size,), config.np_dtype)  # written last
    with pytest.raises(RuntimeError, match="half-way"):
        save(path, bad, config, extra={"step": 2})
    if existing:
        assert path.read_bytes() == old_bytes
        assert load(path).extra == {"step": 1}
        assert folder_listing(tmp_path) == ["c.npz"]
    else:
        assert folder_listing(tmp_path) == []


def test_failure_after_all_bytes_are_written_still_leaves_the_old_file(tmp_path, monkeypatch):
    config = small_config()
    path = tmp_path / "c.npz"
    save(path, random_params(config, seed=1), config)
    old_bytes = path.read_bytes()

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        save(path, random_params(config, seed=2), config)
    assert path.read_bytes() == old_bytes
    assert folder_listing(tmp_path) == ["c.npz"]


# ---------------------------------------------------------------------------------------------
# unreadable checkpoints


@pytest.fixture
def saved(tmp_path):
    config = small_config()
    path = tmp_path / "good.npz"
    save(path, random_params(config), config, extra={"adamw": adamw_init(random_params(config))})
    return path


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.npz"
    with pytest.raises(CheckpointError, match="nowhere.npz.*does not exist"):
        load(path)
    with pytest.raises(ValueError, match="is not a file"):
        load(tmp_path)


@pytest.mark.parametrize("keep_fraction", [0.0, 0.001, 0.5, 0.999])
def test_truncated_file(tmp_path, saved, keep_fraction):
    data = saved.read_bytes()
    path = tmp_path / "cut.npz"
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(CheckpointError, match="cut.npz.*(truncated|corrupt)"):
        load(path)


def test_flipped_byte_in_the_data_is_detected(tmp_path, saved):
    data = bytearray(saved.read_bytes())
    with zipfile.ZipFile(saved) as archive:
        info = archive.getinfo("wte.weight.npy")
    data[info.header_offset + 30 + len(info.filename) + info.compress_size - 3] ^= 0xFF  # last array bytes
    path = tmp_path / "flipped.npz"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="flipped.npz.*corrupt"):
        load(path)


def test_garbage_and_foreign_files(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(CheckpointError, match="garbage.npz"):
        load(garbage)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="notes.txt"):
        load(text)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, weights=np.ones(3))
    with pytest.raises(CheckpointError, match="foreign.npz.*not a kto_np checkpoint"):
        load(foreign)
    single = tmp_path / "single.npy"
    np.save(single, np.ones(3))
    with pytest.raises(CheckpointError, match="single.npy.*not a kto_np checkpoint"):
        load(single)


def rewrite(source, target, change):
    """Copy a checkpoint's entries with plain NumPy, letting `change` edit the dict first."""
    with np.load(source, allow_pickle=False) as data:
        entries = {k: data[k] for k in data.files}
    change(entries)
    with open(target, "wb") as f:
        np.savez(f, **entries)


def test_newer_format_version(tmp_path, saved):
    path = tmp_path / "future.npz"
    rewrite(saved, path, lambda e: e.update(__kto_np_format__=np.array(3)))
    with pytest.raises(CheckpointError, match=r"future.npz.*format version 3.*upgrade"):
        load(path)


def test_format_version_1_loads_only_without_extra_state(tmp_path, saved):
    """Version 1 stored the extra state as nested JSON with array markers; its parameters are the same."""
    with_extra = tmp_path / "v1_extra.npz"
    rewrite(saved, with_extra, lambda e: e.update(__kto_np_format__=np.array(1)))
    with pytest.raises(CheckpointError, match=r"v1_extra.npz.*format version 1.*extra state"):
        load(with_extra)
    params_only = tmp_path / "v1.npz"
    rewrite(saved, params_only, lambda e: [e.update(__kto_np_format__=np.array(1)), e.pop("__extra_json__"),
                                           *[e.pop(k) for k in list(e) if k.startswith("extra/")]])
    assert_params_bit_equal(load(params_only).params, load(saved).params)
    assert load(params_only).extra == {}


def test_unchanged_copy_loads(tmp_path, saved):
    path = tmp_path / "copy.npz"
    rewrite(saved, path, lambda e: None)
    assert_params_bit_equal(load(path).params, load(saved).params)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda e: e.pop("h.1.mlp.c_fc.bias"), r"missing keys \['h.1.mlp.c_fc.bias'\]"),
        (lambda e: e.update({"h.2.ln_1.weight": np.ones(8)}), r"unexpected keys \['h.2.ln_1.weight'\]"),
        (lambda e: e.update({"wpe.weight": np.ones((7, 9))}), r"wpe.weight: expected \(7, 8\), got \(7, 9\)"),
        (lambda e: e.update({"ln_f.weight": np.ones(8, np.float32)}), r"dtype float64.*ln_f.weight"),
        (lambda e: e.pop("__config_json__"), "__config_json__"),
        (lambda e: e.update(__config_json__=np.array("{not json")), "not valid JSON"),
        (lambda e: e.update(__config_json__=np.array('{"vocab_size": 11, "colour": 1}')), "colour"),
        (lambda e: e.update(__config_json__=np.array('{"num_heads": 3, "hidden_size": 8}')), "num_heads"),
        (lambda e: e.update(__kto_np_format__=np.array("1")), "__kto_np_format__"),
        (lambda e: e.update({"extra/adamw/step/x": np.ones(2)}), r"'adamw/step/x' clashes"),
        (lambda e: e.update({"extra/adamw/step": np.ones(2)}), r"'adamw/step' clashes"),
        (lambda e: e.update(__extra_json__=np.array("[1]")), "__extra_json__.*JSON object"),
        (lambda e: e.update(__extra_json__=np.array("{")), "__extra_json__.*not valid JSON"),
        (lambda e: e.update(__surprise__=np.array(1)), "__surprise__"),
    ],
)
def test_inconsistent_contents(tmp_path, saved, change, match):
    path = tmp_path / "edited.npz"
    rewrite(saved, path, change)
    with pytest.raises(CheckpointError, match="edited.npz") as caught:
        load(path)
    assert caught.match(match)


# ---------------------------------------------------------------------------------------------
# bad arguments to save


def test_save_rejects_bad_arguments(tmp_path):
    config = small_config()
    params = random_params(config)
    path = tmp_path / "c.npz"
    with pytest.raises(TypeError, match="config"):
        save(path, params, config.to_dict())
    with pytest.raises(TypeError, match="params"):
        save(path, list(params.values()), config)
    with pytest.raises(ValueError, match=r"params.*missing keys \['ln_f.bias'\]"):
        save(path, {k: v for k, v in params.items() if k != "ln_f.bias"}, config)
    with pytest.raises(ValueError, match=r"params\['wte.weight'\].*dtype float64.*float32"):
        save(path, {**params, "wte.weight": params["wte.weight"].astype(np.float32)}, config)
    with pytest.raises(TypeError, match="extra"):
        save(path, params, config, extra=[1, 2])
    with pytest.raises(TypeError, match=r"extra\['opt'\]\['f'\]"):
        save(path, params, config, extra={"opt": {"f": object()}})
    with pytest.raises(TypeError, match=r"extra\['history'\]\[1\].*not inside lists"):
        save(path, params, config, extra={"history": [1.0, np.ones(2)]})
    with pytest.raises(TypeError, match=r"extra\['objects'\].*objects"):
        save(path, params, config, extra={"objects": np.array([None, 1], dtype=object)})
    with pytest.raises(TypeError, match=r"extra keys must be str"):
        save(path, params, config, extra={1: 2})
    with pytest.raises(ValueError, match=r"extra\['a/b'\].*'/'"):
        save(path, params, config, extra={"a/b": np.ones(2)})
    with pytest.raises(ValueError, match="path"):
        save(tmp_path, params, config)
    assert folder_listing(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Hugging Face GPT-2 state dicts


def expected_hf_shapes(config):
    """GPT2LMHeadModel's parameter names and shapes, written out from the Hugging Face layout."""
    V, T, C = config.vocab_size, config.max_seq_len, config.hidden_size
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C)}
    for i in range(config.num_layers):
        block = {
            "ln_1.weight": (C,), "ln_1.bias": (C,),
            "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
            "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
            "ln_2.weight": (C,), "ln_2.bias": (C,),
            "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,),
            "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,),
        }
        shapes.update({f"transformer.h.{i}.{k}": s for k, s in block.items()})
    shapes.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,), "lm_head.weight": (V, C)})
    return shapes


@pytest.mark.parametrize("tie_embeddings", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_hf_round_trip(tie_embeddings, dtype):
    config = small_config(tie_embeddings=tie_embeddings, dtype=dtype)
    params = random_params(config, seed=4)
    state_dict = params_to_hf_gpt2(params, config)

    assert {k: v.shape for k, v in state_dict.items()} == expected_hf_shapes(config)
    assert list(state_dict) == list(expected_hf_shapes(config))
    assert all(type(v) is np.ndarray and v.dtype == config.np_dtype for v in state_dict.values())
    lm_head = params["wte.weight"] if tie_embeddings else params["lm_head.weight"]
    assert_bit_equal("lm_head.weight", state_dict["lm_head.weight"], lm_head)
    assert_bit_equal("h.1.attn.c_attn.weight", state_dict["transformer.h.1.attn.c_attn.weight"],
                     params["h.1.attn.c_attn.weight"])
    state_dict["transformer.wte.weight"][0, 0] += 1.0  # copies: the params are not touched
    assert state_dict["transformer.wte.weight"][0, 0] != params["wte.weight"][0, 0]
    state_dict["transformer.wte.weight"][0, 0] -= 1.0

    back, back_config = params_from_hf_gpt2(state_dict, num_heads=config.num_heads)
    assert back_config == config
    assert_params_bit_equal(back, params)
    back["ln_f.bias"][0] += 1.0
    assert back["ln_f.bias"][0] != state_dict["transformer.ln_f.bias"][0]


def test_hf_names_without_prefix_and_with_mask_buffers():
    config = small_config()
    params = random_params(config, seed=6)
    hf = params_to_hf_gpt2(params, config)
    T = config.max_seq_len
    bare = {k.removeprefix("transformer."): v for k, v in hf.items()}
    with_buffers = dict(hf)
    for i in range(config.num_layers):
        with_buffers[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((1, 1, T, T), dtype=bool))
        with_buffers[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4)
    del bare["lm_head.weight"]  # GPT2Model has no head: tied
    for state_dict in (bare, with_buffers):
        back, back_config = params_from_hf_gpt2(state_dict, num_heads=2, config_overrides={"dropout": 0.0})
        assert back_config == GPTConfig(**{**config.to_dict(), "dropout": 0.0})
        assert_params_bit_equal(back, params)


def test_hf_lm_head_decides_tying_and_overrides_apply():
    config = small_config(tie_embeddings=False)
    params = random_params(config, seed=7)
    hf = params_to_hf_gpt2(params, config)
    assert params_from_hf_gpt2(hf, num_heads=2)[1].tie_embeddings is False

    tied_hf = {**hf, "lm_head.weight": hf["transformer.wte.weight"].copy()}
    tied, tied_config = params_from_hf_gpt2(tied_hf, num_heads=2)
    assert tied_config.tie_embeddings is True and "lm_head.weight" not in tied

    overrides = {"tie_embeddings": False, "dtype": "float32"}
    untied, untied_config = params_from_hf_gpt2(tied_hf, num_heads=4, config_overrides=overrides)
    assert untied_config.tie_embeddings is False and untied_config.num_heads == 4
    assert untied["lm_head.weight"].dtype == np.float32
    np.testing.assert_array_equal(untied["lm_head.weight"], hf["transformer.wte.weight"].astype(np.float32))
    assert untied["lm_head.weight"] is not untied["wte.weight"]

    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        params_from_hf_gpt2(hf, num_heads=2, config_overrides={"tie_embeddings": True})


def test_hf_sinusoidal_needs_max_seq_len():
    config = small_config(positional="sinusoidal", max_seq_len=9)
    params = random_params(config, seed=8)
    hf = params_to_hf_gpt2(params, config)
    assert "transformer.wpe.weight" not in hf
    with pytest.raises(ValueError, match="max_seq_len"):
        params_from_hf_gpt2(hf, num_heads=2)
    back, back_config = params_from_hf_gpt2(hf, num_heads=2, config_overrides={"max_seq_len": 9})
    assert back_config == config
    assert_params_bit_equal(back, params)


def test_hf_accepts_torch_tensors():
    torch = pytest.importorskip("torch", reason=TORCH_SKIP)
    config = small_config(dtype="float32", tie_embeddings=False)
    params = random_params(config, seed=9)
    torch_state = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in
                   params_to_hf_gpt2(params, config).items()}
    torch_state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 7, 7, dtype=torch.bool)
    back, back_config = params_from_hf_gpt2(torch_state, num_heads=2)
    assert back_config == config
    assert_params_bit_equal(back, params)
    with torch.no_grad():
        torch_state["transformer.wte.weight"][0, 0] += 1.0  # our arrays do not share its memory
    assert back["wte.weight"][0, 0] == params["wte.weight"][0, 0]
    half = {k: v.detach().half() for k, v in torch_state.items()}
    with pytest.raises(ValueError, match="dtype"):
        params_from_hf_gpt2(half, num_heads=2)
    converted, converted_config = params_from_hf_gpt2(
        half, num_heads=2, config_overrides={"dtype": "float32"}
    )
    assert converted_config.dtype == "float32" and converted["wte.weight"].dtype == np.float32
    with pytest.raises(TypeError, match=r"state_dict\['transformer.wte.weight'\].*float"):
        params_from_hf_gpt2({"transformer.wte.weight": torch.zeros(3, 2, dtype=torch.bfloat16)}, num_heads=1)


@pytest.mark.parametrize(
    "change, kwargs, error, match",
    [
        (lambda sd: sd.pop("transformer.h.1.mlp.c_fc.bias"), {}, ValueError,
         r"missing keys \['h.1.mlp.c_fc.bias'\]"),
        (lambda sd: sd.update({"transformer.h.0.ln_2.weight": np.ones(5)}), {}, ValueError,
         r"h.0.ln_2.weight: expected \(8,\), got \(5,\)"),
        (lambda sd: sd.update({"score.weight": np.ones((2, 8))}), {}, ValueError,
         r"unexpected keys \['score.weight'\]"),
        (lambda sd: sd.pop("transformer.wte.weight"), {}, ValueError, "wte.weight"),
        (lambda sd: sd.update({"transformer.wte.weight": np.ones(8)}), {}, ValueError, "wte.weight.*2-D"),
        (lambda sd: sd.update({"wte.weight": sd["transformer.wte.weight"]}), {}, ValueError, "prefix"),
        (lambda sd: [sd.pop(k) for k in list(sd) if ".h.0." in k], {}, ValueError, r"block numbers \[1\]"),
        (lambda sd: sd.update({"transformer.ln_f.bias": np.ones(8, np.float32)}), {}, ValueError, "dtype"),
        (lambda sd: None, {"num_heads": 3}, ValueError, "num_heads"),
        (lambda sd: None, {"num_heads": 0}, ValueError, "num_heads"),
        (lambda sd: None, {"config_overrides": {"heads": 2}}, ValueError, r"config_overrides.*\['heads'\]"),
        (lambda sd: None, {"config_overrides": {"num_heads": 2}}, ValueError, "num_heads"),
        (lambda sd: None, {"config_overrides": {"vocab_size": 12}}, ValueError, "wte.weight"),
        (lambda sd: None, {"config_overrides": [("dropout", 0.0)]}, TypeError, "config_overrides"),
    ],
)
def test_hf_rejects_bad_state_dicts(change, kwargs, error, match):
    config = small_config()
    state_dict = params_to_hf_gpt2(random_params(config), config)
    change(state_dict)
    with pytest.raises(error, match=match):
        params_from_hf_gpt2(state_dict, **{"num_heads": 2, **kwargs})


def test_hf_rejects_non_mappings_and_bad_config():
    config = small_config()
    with pytest.raises(TypeError, match="state_dict"):
        params_from_hf_gpt2([("wte.weight", np.ones((2, 2)))], num_heads=1)
    with pytest.raises(TypeError, match="config"):
        params_to_hf_gpt2(random_params(config), config.to_dict())
    with pytest.raises(ValueError, match="params"):
        params_to_hf_gpt2({}, config)


def test_untying_a_tied_gpt2_state_dict_copies_wte_into_the_head():
    config = small_config(tie_embeddings=True)
    state_dict = params_to_hf_gpt2(random_params(config), config)
    del state_dict["lm_head.weight"]  # tied GPT-2 files often leave the head out
    params, untied = params_from_hf_gpt2(state_dict, num_heads=config.num_heads,
                                         config_overrides={"tie_embeddings": False})
    assert untied.tie_embeddings is False
    np.testing.assert_array_equal(params["lm_head.weight"], state_dict["transformer.wte.weight"])
    assert params["lm_head.weight"] is not params["wte.weight"]
