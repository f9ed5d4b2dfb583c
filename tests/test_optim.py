"""AdamW, gradient clipping and the learning-rate schedule against closed forms and PyTorch."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kto_np.gradcheck import rel_error
from kto_np.model import GPTConfig, param_shapes
from kto_np.optim import adamw_init, adamw_step, check_adamw_state, clip_grad_norm, learning_rate
from kto_np.validation import NonFiniteError

TORCH_SKIP = "torch not installed (pip install 'kto_np[torch]')"

TINY = GPTConfig(vocab_size=7, max_seq_len=5, hidden_size=4, num_layers=1, num_heads=2, dtype="float64")


def random_params(rng, dtype=np.float64, config=TINY):
    return {k: rng.standard_normal(s).astype(dtype) for k, s in param_shapes(config).items()}


def random_grads(rng, params, scale=1.0):
    return {k: (scale * rng.standard_normal(p.shape)).astype(p.dtype) for k, p in params.items()}


def copy_dict(arrays):
    return {k: v.copy() for k, v in arrays.items()}


def assert_close(name, mine, theirs, tol):
    err = rel_error(mine, theirs)
    assert err <= tol, (
        f"{name}: rel error {err:.3e} > {tol:.0e}\n"
        f" mine:   {np.ravel(mine)[:4]}\n theirs: {np.ravel(theirs)[:4]}"
    )


# ---------------------------------------------------------------------------------------------
# AdamW


def test_two_steps_match_the_closed_form(rng):
    params = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    g1, g2 = random_grads(rng, params), random_grads(rng, params)
    lr, b1, b2, eps, wd = 0.05, 0.8, 0.95, 1e-6, 0.3
    start = copy_dict(params)
    state = adamw_init(params)

    adamw_step(params, g1, state, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    for name in params:
        decay = wd if name == "w" else 0.0
        # t = 1: m̂ = g, v̂ = g², so the step is lr · g / (|g| + eps)
        expected = start[name] * (1 - lr * decay) - lr * g1[name] / (np.abs(g1[name]) + eps)
        assert_close(f"params[{name}] after step 1", params[name], expected, 1e-14)
        assert_close(f"m[{name}]", state["m"][name], (1 - b1) * g1[name], 1e-15)
        assert_close(f"v[{name}]", state["v"][name], (1 - b2) * g1[name] ** 2, 1e-15)
    assert state["step"] == 1

    after_one = copy_dict(params)
    adamw_step(params, g2, state, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    for name in params:
        decay = wd if name == "w" else 0.0
        m = b1 * (1 - b1) * g1[name] + (1 - b1) * g2[name]
        v = b2 * (1 - b2) * g1[name] ** 2 + (1 - b2) * g2[name] ** 2
        m_hat, v_hat = m / (1 - b1**2), v / (1 - b2**2)
        expected = after_one[name] * (1 - lr * decay) - lr * m_hat / (np.sqrt(v_hat) + eps)
        assert_close(f"params[{name}] after step 2", params[name], expected, 1e-14)
    assert state["step"] == 2


def test_zero_learning_rate_changes_nothing_but_the_moments(rng):
    params = random_params(rng)
    start = copy_dict(params)
    state = adamw_init(params)
    adamw_step(params, random_grads(rng, params), state, lr=0.0)
    for name in params:
        np.testing.assert_array_equal(params[name], start[name], err_msg=name)
    assert any(np.any(m != 0) for m in state["m"].values())


def test_decay_mask_picks_the_decayed_parameters(rng):
    params = {"w": rng.standard_normal((2, 3)), "b": rng.standard_normal(3)}
    grads = {"w": np.zeros((2, 3)), "b": np.zeros(3)}  # zero gradient: only the decay moves a param
    lr, wd = 0.1, 0.5
    for mask, decayed in [(None, {"w"}), (lambda name: True, {"w", "b"}), (lambda name: name == "b", {"b"})]:
        current = copy_dict(params)
        adamw_step(current, grads, adamw_init(current), lr=lr, weight_decay=wd, decay_mask=mask)
        for name in params:
            factor = 1 - lr * wd if name in decayed else 1.0
            np.testing.assert_allclose(current[name], params[name] * factor, rtol=1e-15, err_msg=name)


def test_parity_with_torch_adamw(rng):
    torch = pytest.importorskip("torch", reason=TORCH_SKIP)
    config = GPTConfig(vocab_size=11, max_seq_len=6, hidden_size=8, num_layers=2, num_heads=2,
                       dtype="float64", tie_embeddings=False)
    params = random_params(rng, config=config)
    torch_params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    lr, betas, eps, wd = 3e-2, (0.85, 0.99), 1e-7, 0.1
    groups = [
        {"params": [p for k, p in torch_params.items() if p.ndim >= 2], "weight_decay": wd},
        {"params": [p for k, p in torch_params.items() if p.ndim < 2], "weight_decay": 0.0},
    ]
    torch_opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)
    state = adamw_init(params)
    for step in range(6):
        grads = random_grads(rng, params, scale=10.0 ** (step % 3 - 1))
        for k, p in torch_params.items():
            p.grad = torch.tensor(grads[k])
        torch_opt.step()
        adamw_step(params, grads, state, lr=lr, betas=betas, eps=eps, weight_decay=wd)
        for k, p in torch_params.items():
            assert_close(f"params[{k}] at step {step + 1}", params[k], p.detach().numpy(), 1e-13)
            torch_state = torch_opt.state[p]
            assert_close(f"m[{k}]", state["m"][k], torch_state["exp_avg"].numpy(), 1e-13)
            assert_close(f"v[{k}]", state["v"][k], torch_state["exp_avg_sq"].numpy(), 1e-13)
    assert state["step"] == 6


def test_float32_stays_float32_and_tracks_float64(rng):
    params32 = random_params(rng, np.float32)
    params64 = {k: v.astype(np.float64) for k, v in params32.items()}
    state32, state64 = adamw_init(params32), adamw_init(params64)
    for _ in range(4):
        grads32 = random_grads(rng, params32)
        adamw_step(params32, grads32, state32, lr=1e-2)
        adamw_step(params64, {k: g.astype(np.float64) for k, g in grads32.items()}, state64, lr=1e-2)
    for name in params32:
        assert params32[name].dtype == np.float32, name
        assert state32["m"][name].dtype == np.float32 and state32["v"][name].dtype == np.float32, name
        assert_close(f"float32 params[{name}]", params32[name], params64[name], 1e-6)


def test_adamw_is_deterministic():
    runs = []
    for _ in range(2):
        rng = np.random.default_rng(7)
        params = random_params(rng, np.float32)
        state = adamw_init(params)
        for _ in range(3):
            adamw_step(params, random_grads(rng, params), state, lr=1e-3)
        runs.append(params)
    for name in runs[0]:
        assert runs[0][name].tobytes() == runs[1][name].tobytes(), name


def test_adamw_init_gives_zero_moments_like_params(rng):
    params = random_params(rng, np.float32)
    state = adamw_init(params)
    assert state["step"] == 0 and list(state["m"]) == list(params) and list(state["v"]) == list(params)
    for name, p in params.items():
        for moment in ("m", "v"):
            arr = state[moment][name]
            assert arr.shape == p.shape and arr.dtype == p.dtype and not np.any(arr), (moment, name)
            assert arr is not p


@pytest.mark.parametrize(
    "change, kwargs, error, match",
    [
        ("drop_grad", {}, ValueError, r"grads.*missing \['b'\]"),
        ("extra_grad", {}, ValueError, r"grads.*unexpected \['c'\]"),
        ("grad_shape", {}, ValueError, r"grads\['w'\].*shape"),
        ("grad_dtype", {}, ValueError, r"grads\['w'\].*dtype"),
        ("grad_nan", {}, ValueError, r"grads\['b'\].*finite"),
        ("grad_not_array", {}, TypeError, r"grads\['w'\]"),
        ("state_keys", {}, ValueError, "state"),
        ("state_step", {}, ValueError, r"state\['step'\]"),
        ("state_m_shape", {}, ValueError, r"state\['m'\]\['w'\]"),
        (None, {"lr": -1.0}, ValueError, "lr"),
        (None, {"lr": float("nan")}, ValueError, "lr"),
        (None, {"lr": "0.1"}, TypeError, "lr"),
        (None, {"betas": (0.9, 1.0)}, ValueError, r"betas\[1\]"),
        (None, {"betas": (-0.1, 0.9)}, ValueError, r"betas\[0\]"),
        (None, {"betas": (0.9,)}, ValueError, "betas"),
        (None, {"eps": 0.0}, ValueError, "eps"),
        (None, {"weight_decay": -0.1}, ValueError, "weight_decay"),
        (None, {"decay_mask": "w"}, TypeError, "decay_mask"),
    ],
)
def test_adamw_step_rejects_bad_input_and_changes_nothing(rng, change, kwargs, error, match):
    params = {"w": rng.standard_normal((2, 3)), "b": rng.standard_normal(3)}
    grads = random_grads(rng, params)
    state = adamw_init(params)
    if change == "drop_grad":
        del grads["b"]
    elif change == "extra_grad":
        grads["c"] = np.zeros(2)
    elif change == "grad_shape":
        grads["w"] = np.zeros((3, 2))
    elif change == "grad_dtype":
        grads["w"] = grads["w"].astype(np.float32)
    elif change == "grad_nan":
        grads["b"][1] = np.nan
    elif change == "grad_not_array":
        grads["w"] = [[0.0] * 3] * 2
    elif change == "state_keys":
        del state["v"]
    elif change == "state_step":
        state["step"] = -1
    elif change == "state_m_shape":
        state["m"]["w"] = np.zeros(6)
    start = copy_dict(params)
    with pytest.raises(error, match=match):
        adamw_step(params, grads, state, **{"lr": 0.1, **kwargs})
    for name in params:
        np.testing.assert_array_equal(params[name], start[name], err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_gradient_whose_square_overflows_is_rejected_before_anything_is_written(rng, dtype):
    params = {"w": rng.standard_normal((2, 3)).astype(dtype), "b": rng.standard_normal(3).astype(dtype)}
    grads = random_grads(rng, params)
    grads["b"][2] = 2.0 * math.sqrt(float(np.finfo(dtype).max))  # finite, but its square is not
    state = adamw_init(params)
    start = copy_dict(params)
    with pytest.raises(NonFiniteError, match=r"grads\['b'\].*square overflows"):
        adamw_step(params, grads, state, lr=0.1)
    assert state["step"] == 0
    for name in params:
        np.testing.assert_array_equal(params[name], start[name], err_msg=name)
        assert not np.any(state["m"][name]) and not np.any(state["v"][name]), name
    grads["b"][2] = 0.5 * math.sqrt(float(np.finfo(dtype).max))  # its square fits: accepted
    adamw_step(params, grads, state, lr=0.1)
    assert all(np.isfinite(v).all() for v in state["v"].values())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_parameters_and_gradients_are_rejected_by_name(rng, bad):
    for where in ("params", "grads"):
        params = {"w": rng.standard_normal((2, 3)), "b": rng.standard_normal(3)}
        grads = random_grads(rng, params)
        {"params": params, "grads": grads}[where]["w"][1, 2] = bad
        state = adamw_init(params)
        with pytest.raises(NonFiniteError, match=rf"{where}\['w'\] must be finite"):
            adamw_step(params, grads, state, lr=0.1)
        assert state["step"] == 0 and not np.any(state["m"]["b"]), where


def test_an_lr_too_large_for_the_dtype_is_reported_after_the_step(rng):
    params = {"w": rng.standard_normal((2, 3)).astype(np.float32)}
    grads = random_grads(rng, params)
    state = adamw_init(params)
    with pytest.raises(NonFiniteError, match=r"lr=1e\+39 made params\['w'\] overflow"):
        adamw_step(params, grads, state, lr=1e39)  # finite as a Python float, not as a float32
    assert state["step"] == 1  # the step was applied, as the message says
    assert not np.isfinite(params["w"]).all()


def test_adamw_updates_non_contiguous_parameters_in_place(rng):
    base = rng.standard_normal((6, 8))
    params = {"w": base[:, ::2]}  # a strided view of base
    contiguous = {"w": np.ascontiguousarray(base[:, ::2])}
    grads = {"w": rng.standard_normal((6, 4))}
    for current in (params, contiguous):
        adamw_step(current, grads, adamw_init(current), lr=0.1)
    assert params["w"].base is base
    np.testing.assert_array_equal(base[:, ::2], contiguous["w"])


def test_check_adamw_state_returns_the_step_and_rejects_a_foreign_state(rng):
    params = random_params(rng)
    state = adamw_init(params)
    adamw_step(params, random_grads(rng, params), state, lr=1e-3)
    assert check_adamw_state(state, params) == 1
    with pytest.raises(ValueError, match=r"state\['v'\]"):
        check_adamw_state({**state, "v": {k: v[..., None] for k, v in state["v"].items()}}, params)
    with pytest.raises(ValueError, match="state"):
        check_adamw_state(None, params)


def test_adamw_init_rejects_non_dicts_and_integer_arrays():
    with pytest.raises(TypeError, match="params"):
        adamw_init([np.zeros(3)])
    with pytest.raises(TypeError, match=r"params\['w'\]"):
        adamw_init({"w": np.zeros(3, dtype=np.int64)})


# ---------------------------------------------------------------------------------------------
# clip_grad_norm


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_grad_norm_matches_numpy_norm_of_the_concatenation(rng, dtype):
    grads = random_grads(rng, random_params(rng, dtype))
    expected_norm = np.linalg.norm(np.concatenate([g.astype(np.float64).ravel() for g in grads.values()]))
    start = copy_dict(grads)

    total = clip_grad_norm(grads, max_norm=2.0 * expected_norm)  # below the limit: untouched
    assert isinstance(total, float)
    assert abs(total - expected_norm) <= 1e-13 * expected_norm, (total, expected_norm)
    for name in grads:
        assert grads[name].tobytes() == start[name].tobytes(), name

    max_norm = 0.25 * expected_norm
    total = clip_grad_norm(grads, max_norm=max_norm)
    assert abs(total - expected_norm) <= 1e-13 * expected_norm, (total, expected_norm)
    coef = max_norm / (expected_norm + 1e-6)
    for name in grads:
        assert grads[name].dtype == dtype, name
        assert_close(f"clipped grads[{name}]", grads[name], start[name].astype(np.float64) * coef,
                     1e-15 if dtype == np.float64 else 1e-7)
    clipped_norm = np.linalg.norm(np.concatenate([g.astype(np.float64).ravel() for g in grads.values()]))
    assert abs(clipped_norm - max_norm) <= 1e-5 * max_norm, (clipped_norm, max_norm)


def test_clip_grad_norm_matches_torch(rng):
    torch = pytest.importorskip("torch", reason=TORCH_SKIP)
    for max_norm in (0.5, 1e3):
        grads = random_grads(rng, random_params(rng))
        torch_params = []
        for g in grads.values():
            p = torch.nn.Parameter(torch.zeros(g.shape, dtype=torch.float64))
            p.grad = torch.tensor(g)
            torch_params.append(p)
        torch_norm = float(torch.nn.utils.clip_grad_norm_(torch_params, max_norm, foreach=False))
        total = clip_grad_norm(grads, max_norm)
        assert abs(total - torch_norm) <= 1e-13 * torch_norm, (total, torch_norm)
        for (name, g), p in zip(grads.items(), torch_params, strict=True):
            assert_close(f"grads[{name}] (max_norm={max_norm})", g, p.grad.numpy(), 1e-15)


def test_clip_grad_norm_float32_accumulates_in_float64(rng):
    grads = {"w": (rng.standard_normal((300, 300)) * 1e3).astype(np.float32), "b": np.float32([1e-3, 3e4])}
    expected = float(np.linalg.norm(np.concatenate([g.astype(np.float64).ravel() for g in grads.values()])))
    in_float32 = float(np.sqrt(sum(np.sum(g * g) for g in grads.values())))
    assert abs(in_float32 - expected) > 1e-10 * expected  # the check below can tell the two apart
    total = clip_grad_norm(grads, max_norm=1e9)
    assert abs(total - expected) <= 1e-14 * expected, (total, expected, in_float32)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_clip_grad_norm_non_finite_total_is_returned_and_nothing_scaled(rng, bad):
    grads = random_grads(rng, random_params(rng))
    grads["ln_f.bias"][0] = bad
    start = copy_dict(grads)
    total = clip_grad_norm(grads, max_norm=1e-3)
    assert not math.isfinite(total)
    assert (math.isnan(total)) == (bad is np.nan)
    for name in grads:
        np.testing.assert_array_equal(grads[name], start[name], err_msg=name)


def test_clip_grad_norm_of_finite_gradients_whose_squares_overflow(rng):
    grads = {"w": rng.standard_normal((4, 5)), "b": rng.standard_normal(5)}
    grads["w"][1, 1] = 1e200  # its square is beyond the float range
    grads["b"][3] = -3e199
    expected = 1e200 * float(np.linalg.norm(np.concatenate([g.ravel() / 1e200 for g in grads.values()])))
    start = copy_dict(grads)
    total = clip_grad_norm(grads, max_norm=1.0)
    assert abs(total - expected) <= 1e-14 * expected, (total, expected)
    coef = 1.0 / (expected + 1e-6)
    for name in grads:
        assert_close(f"clipped grads[{name}]", grads[name], start[name] * coef, 1e-14)


THREADS_RUN = """
import numpy as np
from kto_np.optim import clip_grad_norm
rng = np.random.default_rng(3)
for dtype in (np.float32, np.float64):
    grads = {"w": rng.standard_normal((700, 600)).astype(dtype), "b": rng.standard_normal(777).astype(dtype)}
    print(repr(clip_grad_norm(grads, 1.0)), grads["w"].tobytes().hex()[:64])
"""


def test_clip_grad_norm_does_not_depend_on_the_blas_thread_count():
    outputs = []
    for threads in ("1", "2"):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OPENBLAS_NUM_THREADS": threads,
               "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        done = subprocess.run([sys.executable, "-c", THREADS_RUN], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout)
    assert len(outputs[0].splitlines()) == 2
    assert outputs[0] == outputs[1], f"1 BLAS thread: {outputs[0]}; 2 threads: {outputs[1]}"


def test_clip_grad_norm_rejects_bad_input():
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm({"w": np.ones(3)}, 0.0)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm({"w": np.ones(3)}, float("inf"))
    with pytest.raises(TypeError, match="grads"):
        clip_grad_norm([np.ones(3)], 1.0)


# ---------------------------------------------------------------------------------------------
# learning_rate


def test_cosine_schedule_at_known_points():
    kw = {"base_lr": 1e-3, "warmup_steps": 10, "total_steps": 110, "min_lr_ratio": 0.1}
    assert learning_rate(0, **kw) == 0.0
    assert learning_rate(5, **kw) == pytest.approx(0.5e-3, rel=1e-15)
    assert learning_rate(10, **kw) == pytest.approx(1e-3, rel=1e-15)
    assert learning_rate(60, **kw) == pytest.approx(0.55e-3, rel=1e-14)  # cos(π/2) = 0: halfway
    # progress 1/4: 1e-4 + 0.9e-3 · (1 + √2/2) / 2
    assert learning_rate(35, **kw) == pytest.approx(1e-4 + 0.9e-3 * (2 + math.sqrt(2)) / 4, rel=1e-14)
    assert learning_rate(110, **kw) == pytest.approx(1e-4, rel=1e-15)
    assert learning_rate(500, **kw) == pytest.approx(1e-4, rel=1e-15)


def test_linear_and_constant_schedules_at_known_points():
    kw = {"base_lr": 2.0, "warmup_steps": 4, "total_steps": 24}
    assert learning_rate(0, schedule="linear", **kw) == 0.0
    assert learning_rate(1, schedule="linear", **kw) == 0.5
    assert learning_rate(4, schedule="linear", **kw) == 2.0
    assert learning_rate(14, schedule="linear", **kw) == pytest.approx(1.0, rel=1e-15)
    assert learning_rate(19, schedule="linear", **kw) == pytest.approx(0.5, rel=1e-15)
    assert learning_rate(24, schedule="linear", **kw) == 0.0
    assert learning_rate(2, schedule="constant", **kw) == 1.0
    assert learning_rate(4, schedule="constant", **kw) == 2.0
    assert learning_rate(100, schedule="constant", **kw) == 2.0
    assert learning_rate(0, base_lr=3.0, warmup_steps=0, total_steps=10) == 3.0


@given(
    warmup=st.integers(0, 20), decay=st.integers(1, 50), ratio=st.floats(0.0, 1.0),
    schedule=st.sampled_from(["cosine", "linear"]),
)
def test_schedule_rises_then_falls_within_bounds(warmup, decay, ratio, schedule):
    kw = {"base_lr": 0.3, "warmup_steps": warmup, "total_steps": warmup + decay,
          "schedule": schedule, "min_lr_ratio": ratio}
    values = [learning_rate(s, **kw) for s in range(warmup + decay + 3)]
    rise, fall = values[: warmup + 1], values[warmup:]
    assert all(a <= b for a, b in zip(rise[:-1], rise[1:], strict=True)), rise
    assert all(a >= b - 1e-15 for a, b in zip(fall[:-1], fall[1:], strict=True)), fall
    assert all(0.3 * ratio - 1e-15 <= v <= 0.3 for v in fall), fall
    assert values[warmup] == 0.3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"step": -1}, ValueError, "step"),
        ({"step": 1.5}, TypeError, "step"),
        ({"base_lr": -1.0}, ValueError, "base_lr"),
        ({"base_lr": float("nan")}, ValueError, "base_lr"),
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"warmup_steps": 20}, ValueError, "warmup_steps"),
        ({"total_steps": 0}, ValueError, "total_steps"),
        ({"schedule": "step"}, ValueError, "schedule"),
        ({"min_lr_ratio": 1.5}, ValueError, "min_lr_ratio"),
        ({"min_lr_ratio": -0.1}, ValueError, "min_lr_ratio"),
    ],
)
def test_learning_rate_rejects_bad_input(kwargs, error, match):
    args = {"step": 3, "base_lr": 0.1, "warmup_steps": 2, "total_steps": 10, **kwargs}
    step = args.pop("step")
    with pytest.raises(error, match=match):
        learning_rate(step, **args)
