"""kto_np.fast.optim against its reading edition, kto_np.optim: the same numbers.

The moments m and v are the same expressions in the same order in both, so they must agree bit for bit;
the parameters go through sqrt(v̂) + eps grouped differently (sqrt(v) / sqrt(1 − β2^t) in the fast room),
so they agree to float64 1e-12 / float32 1e-5 relative. The norms are the same sums added in another
order: 1e-14 relative.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from kto_np import optim as reading
from kto_np.fast import optim as fast
from kto_np.gradcheck import rel_error

TOLERANCE = {np.float64: 1e-12, np.float32: 1e-5}


def make_params(rng, dtype, large=False):
    """A weight matrix, a bias, an embedding; with large=True one of them spans several blocks."""
    shapes = {"w": (13, 7), "b": (7,), "wte.weight": (50, 3)}
    if large:
        shapes["big.weight"] = (3 * fast._BLOCK_ELEMENTS // 1000 + 1, 1000)  # 3 blocks and a partial one
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}


def make_grads(rng, params, scale=1.0):
    return {k: (scale * rng.standard_normal(p.shape)).astype(p.dtype) for k, p in params.items()}


def copy_dict(arrays):
    return {k: v.copy() for k, v in arrays.items()}


def run_both(params, grad_list, **kwargs):
    """The same AdamW steps with each edition, from copies of params: (reading, fast) params and states."""
    results = []
    for edition in (reading, fast):
        current = copy_dict(params)
        state = reading.adamw_init(current)
        for grads in grad_list:
            edition.adamw_step(current, copy_dict(grads), state, **kwargs)
        results.append((current, state))
    return results


def assert_same_steps(params, grad_list, dtype, **kwargs):
    (slow_params, slow_state), (fast_params, fast_state) = run_both(params, grad_list, **kwargs)
    assert slow_state["step"] == fast_state["step"] == len(grad_list)
    for name in params:
        assert fast_params[name].dtype == dtype and fast_state["v"][name].dtype == dtype, name
        for moment in ("m", "v"):
            assert fast_state[moment][name].tobytes() == slow_state[moment][name].tobytes(), (moment, name)
        err = rel_error(fast_params[name], slow_params[name])
        assert err <= TOLERANCE[dtype], f"params[{name}]: rel error {err:.2e}"
        moved = rel_error(fast_params[name], params[name])
        assert moved > 100 * TOLERANCE[dtype], f"params[{name}] hardly moved ({moved:.1e}): the test is blind"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_steps_match_the_reading_edition(dtype, weight_decay):
    rng = np.random.default_rng(1)
    params = make_params(rng, dtype, large=True)
    grad_list = [make_grads(rng, params, scale=10.0 ** (i % 3 - 1)) for i in range(4)]
    assert_same_steps(params, grad_list, dtype, lr=3e-2, betas=(0.85, 0.99), eps=1e-7, weight_decay=weight_decay)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_decay_mask_matches_the_reading_edition(dtype):
    rng = np.random.default_rng(2)
    params = make_params(rng, dtype)
    grad_list = [make_grads(rng, params) for _ in range(3)]
    for mask in (lambda name: True, lambda name: name == "b", lambda name: False):
        assert_same_steps(params, grad_list, dtype, lr=1e-2, weight_decay=0.5, decay_mask=mask)
    # only the decay moves a parameter whose gradient is zero: decayed where the mask says so, in both
    zero = [{k: np.zeros_like(p) for k, p in params.items()}]
    for edition_params, _ in run_both(params, zero, lr=0.1, weight_decay=0.5, decay_mask=lambda n: n == "b"):
        np.testing.assert_array_equal(edition_params["w"], params["w"])
        np.testing.assert_allclose(edition_params["b"], params["b"] * np.float64(1 - 0.05), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_non_contiguous_parameters_match_and_are_updated_in_place(dtype):
    rng = np.random.default_rng(3)
    start = rng.standard_normal((64, 40)).astype(dtype)
    grads = {"w": rng.standard_normal((64, 20)).astype(dtype), "t": rng.standard_normal((20, 22)).astype(dtype)}
    updated = {}
    for edition in (reading, fast):
        base = start.copy()
        params = {"w": base[:, ::2], "t": base[::3, 1::2].T}  # views: a strided one and a transposed one
        state = reading.adamw_init(params)
        for _ in range(3):
            edition.adamw_step(params, grads, state, lr=1e-2, weight_decay=0.1)
        updated[edition] = base
    err = rel_error(updated[fast], updated[reading])
    assert err <= TOLERANCE[dtype], f"rel error {err:.2e}"
    for base in updated.values():  # the views' entries moved in base, and only those
        assert np.all(base[:, ::2] != start[:, ::2]) and np.all(base[::3, 1::2] != start[::3, 1::2])
        np.testing.assert_array_equal(base[1::3, 1::2], start[1::3, 1::2])


def test_blocks_of_any_size_give_the_same_numbers(monkeypatch):
    rng = np.random.default_rng(8)
    params = make_params(rng, np.float32)
    grads = make_grads(rng, params)

    def run(block_elements):
        monkeypatch.setattr(fast, "_BLOCK_ELEMENTS", block_elements)
        current = copy_dict(params)
        state = reading.adamw_init(current)
        for _ in range(3):
            fast.adamw_step(current, grads, state, lr=1e-2, weight_decay=0.1)
        return current, state, fast.clip_grad_norm(copy_dict(grads), 1e9)

    whole, whole_state, whole_norm = run(1 << 18)
    blocked, blocked_state, blocked_norm = run(4)
    for name in params:
        np.testing.assert_array_equal(blocked[name], whole[name], err_msg=name)
        np.testing.assert_array_equal(blocked_state["v"][name], whole_state["v"][name], err_msg=name)
    assert blocked_norm == pytest.approx(whole_norm, rel=1e-14)
    assert whole_norm == pytest.approx(reading.clip_grad_norm(copy_dict(grads), 1e9), rel=1e-14)


# ---------------------------------------------------------------------------------------------
# clip_grad_norm


def clip_both(grads, max_norm):
    slow, quick = copy_dict(grads), copy_dict(grads)
    return reading.clip_grad_norm(slow, max_norm), fast.clip_grad_norm(quick, max_norm), slow, quick


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("ratio", [2.0, 0.25])  # below max_norm: untouched; above: scaled down
def test_clip_grad_norm_matches_the_reading_edition(dtype, ratio):
    rng = np.random.default_rng(4)
    grads = make_grads(rng, make_params(rng, dtype, large=True))
    grads["w.t"] = np.asarray(rng.standard_normal((30, 20)).astype(dtype).T)  # non-contiguous
    norm = float(np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values())))
    slow_total, fast_total, slow, quick = clip_both(grads, ratio * norm)
    assert isinstance(fast_total, float)
    assert abs(fast_total - slow_total) <= 1e-14 * slow_total, (fast_total, slow_total)
    assert abs(fast_total - norm) <= 1e-13 * norm, (fast_total, norm)
    for name in grads:
        assert quick[name].dtype == dtype, name
        if ratio > 1.0:
            assert quick[name].tobytes() == grads[name].tobytes() == slow[name].tobytes(), name
        else:
            err = rel_error(quick[name], slow[name])
            assert err <= TOLERANCE[dtype], f"grads[{name}]: rel error {err:.2e}"
            assert rel_error(quick[name], grads[name]) > 0.5, name  # really scaled


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_clip_grad_norm_of_huge_finite_gradients_matches(dtype):
    rng = np.random.default_rng(5)
    grads = make_grads(rng, make_params(rng, dtype, large=True))
    huge = float(np.finfo(dtype).max) / 4  # float64: its square overflows, the norm takes the scaled path
    grads["w"][2, 3] = huge
    grads["b"][1] = -huge / 3
    slow_total, fast_total, slow, quick = clip_both(grads, 1.0)
    assert math.isfinite(fast_total) and fast_total >= huge
    assert abs(fast_total - slow_total) <= 1e-14 * slow_total, (fast_total, slow_total)
    for name in grads:
        err = rel_error(quick[name], slow[name])
        assert err <= TOLERANCE[dtype], f"grads[{name}]: rel error {err:.2e}"


@pytest.mark.parametrize("grads, expected", [
    ({"w": np.full((3, 3), 1e308), "b": np.ones(2)}, math.inf),  # a norm beyond the float range
    ({"w": np.array([1.0, np.nan]), "b": np.ones(2)}, math.nan),
    ({"w": np.array([1.0, np.inf]), "b": np.ones(2)}, math.inf),
])
def test_a_non_finite_norm_is_returned_and_nothing_is_scaled(grads, expected):
    slow_total, fast_total, slow, quick = clip_both(grads, 1e-3)
    for total in (slow_total, fast_total):
        assert (math.isnan(total) and math.isnan(expected)) or total == expected, total
    for name in grads:
        np.testing.assert_array_equal(quick[name], grads[name])
        np.testing.assert_array_equal(slow[name], grads[name])


def test_empty_gradients_have_norm_zero():
    assert fast.clip_grad_norm({}, 1.0) == reading.clip_grad_norm({}, 1.0) == 0.0
    assert fast.clip_grad_norm({"e": np.zeros((0, 3))}, 1.0) == 0.0


THREADS_RUN = """
import numpy as np
from kto_np.fast.optim import clip_grad_norm
rng = np.random.default_rng(3)
for dtype in (np.float32, np.float64):
    grads = {"w": rng.standard_normal((700, 600)).astype(dtype), "b": rng.standard_normal(777).astype(dtype)}
    print(repr(clip_grad_norm(grads, 1.0)), grads["w"].tobytes().hex()[:64])
"""


def test_the_fast_norm_does_not_depend_on_the_blas_thread_count():
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


def test_the_fast_room_shares_the_reading_editions_init_and_schedule():
    assert fast.adamw_init is reading.adamw_init
    assert fast.learning_rate is reading.learning_rate
    assert fast.check_adamw_state is reading.check_adamw_state
