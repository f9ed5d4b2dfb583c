"""backend, gradcheck, files and validation: the small modules everything stands on."""

import os

import numpy as np
import pytest

from kto_np import backend, files, gradcheck, validation


def test_scatter_add_sums_repeated_indices(rng):
    target = np.zeros((5, 3))
    indices = np.array([[0, 2], [2, 4]])
    values = rng.standard_normal((2, 2, 3))
    backend.scatter_add(target, indices, values)
    expected = np.zeros((5, 3))
    for (i, j), v in np.ndenumerate(indices):
        expected[v] += values[i, j]
    np.testing.assert_array_equal(target, expected)


def test_backend_selection_and_dtypes(monkeypatch):
    assert backend.get_backend() in backend.BACKENDS
    assert backend.array_module(np.zeros(2), [1.0]) is np
    assert isinstance(backend.to_numpy([1, 2]), np.ndarray)
    assert backend.resolve_dtype("float32") == np.float32 and backend.resolve_dtype(np.float64) == np.float64
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.set_backend("jax")
    with pytest.raises(ValueError, match="dtype must be one of"):
        backend.resolve_dtype("float16")
    with pytest.raises(ValueError, match="dtype must be"):
        backend.resolve_dtype(np.int32)


def test_cupy_backend_when_present():
    cupy = pytest.importorskip("cupy", reason="CuPy not installed (pip install 'kto_np[gpu]')")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"no usable CUDA device: {exc}")
    try:
        assert backend.set_backend("cupy") is cupy
        assert backend.array_module(cupy.zeros(2)) is cupy
        target = cupy.zeros((3, 2))
        backend.scatter_add(target, cupy.array([0, 0, 2]), cupy.ones((3, 2)))
        np.testing.assert_array_equal(backend.to_numpy(target), [[2, 2], [0, 0], [1, 1]])
    finally:
        backend.set_backend("numpy")


def test_numerical_gradient_of_a_known_function(rng):
    x = rng.standard_normal((3, 4))
    a = rng.standard_normal((3, 4))
    x_before = x.copy()
    numerical = gradcheck.numerical_gradient(lambda: float(np.sum(np.sin(x) * a)), x)
    assert gradcheck.rel_error(np.cos(x) * a, numerical) < 1e-9
    np.testing.assert_array_equal(x, x_before)  # restored exactly


def test_check_gradients_catches_a_wrong_gradient(rng):
    small, large = rng.standard_normal(5), rng.standard_normal((20, 10))

    def f():
        return float(np.sum(small**3) + np.sum(np.tanh(large)))

    right = {"small": 3 * small**2, "large": 1 - np.tanh(large) ** 2}
    rows = gradcheck.check_gradients(f, {"small": small, "large": large}, right, max_full_size=10)
    assert [r.mode for r in rows] == ["full", "dir:4"] and all(r.passed for r in rows)
    wrong = {"small": right["small"] * 1.001, "large": right["large"] + 1e-3 * rng.standard_normal((20, 10))}
    rows = gradcheck.check_gradients(f, {"small": small, "large": large}, wrong, max_full_size=10)
    assert not any(r.passed for r in rows)
    report = gradcheck.format_report(rows)
    assert "FAIL" in report and "large" in report


def test_rel_error_definition():
    assert gradcheck.rel_error(np.zeros(3), np.zeros(3)) == 0.0
    assert gradcheck.rel_error(np.array([1.0, 0.0]), np.array([1.0, 1e-12])) == pytest.approx(1e-12 / 1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        gradcheck.rel_error(np.zeros(2), np.zeros(3))


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "out.json"
    files.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with files.atomic_write(path, "w") as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert os.listdir(tmp_path) == ["out.json"]
    with pytest.raises(ValueError, match="directory"):
        files.write_text(tmp_path, "x")


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: validation.as_float_array("x", "abc"), TypeError, "x must be an array"),
        (lambda: validation.as_float_array("x", [1.0, np.nan]), ValueError, "x must be finite"),
        (lambda: validation.as_float_array("x", np.zeros((2, 2)), ndim=1), ValueError, "x must be 1-D"),
        (lambda: validation.as_float_array("x", []), ValueError, "x must not be empty"),
        (lambda: validation.as_index_array("t", [0.5], upper=3), TypeError, "t must hold integers"),
        (lambda: validation.as_index_array("t", [3], upper=3), ValueError, r"t must be in \[0, 3\)"),
        (lambda: validation.as_labels("labels", [0, 2], 2), ValueError, "labels must contain only 0 and 1"),
        (lambda: validation.as_labels("labels", [0, 1], 3), ValueError, r"labels must have shape \(3,\)"),
        (lambda: validation.check_finite_scalar("beta", float("inf")), ValueError, "beta must be finite"),
        (lambda: validation.check_finite_scalar("beta", "0.1"), TypeError, "beta must be a real number"),
        (lambda: validation.check_finite_scalar("beta", 0.0, positive=True), ValueError, "beta must be > 0"),
        (lambda: validation.check_positive_int("n", 0), ValueError, "n must be >= 1"),
        (lambda: validation.check_positive_int("n", 1.5), TypeError, "n must be an integer"),
        (lambda: validation.check_choice("variant", "x", ("a",)), ValueError, "variant must be one of"),
        (lambda: validation.check_fraction("p", 1.0), ValueError, r"p must be in \[0, 1\), got 1.0"),
        (lambda: validation.check_fraction("f", 1.5, include_one=True), ValueError, r"f must be in \[0, 1\]"),
        (lambda: validation.check_fraction("p", "0.1"), TypeError, "p must be a real number"),
        (lambda: validation.check_rng(None, "temperature > 0"), ValueError, "rng must be .* when temperature > 0"),
        (lambda: validation.check_rng(np.random.RandomState(0), "x"), TypeError, "rng must be a numpy"),
    ],
)
def test_validation_messages_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
