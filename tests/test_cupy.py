"""NumPy against CuPy on the same weights: forward, backward (both editions) and a whole KTO training step
agree to rounding (float64: 1e-9, float32: 1e-4); CuPy refuses and allows what tests/strict_cupy.py, the
CPU stand-in that every CI run uses, says it does. Skipped, with the reason, where CuPy or a GPU is
missing."""

import numpy as np
import pytest
import strict_cupy

from kto_np import backend, bench
from kto_np.architectures import build
from kto_np.gradcheck import rel_error

CONFIG = bench.CONFIGS["small"]
TOLERANCE = {"float64": 1e-9, "float32": 1e-4}


@pytest.fixture
def cupy():
    """The CuPy module with the cupy backend selected; numpy is selected again afterwards."""
    try:
        module = backend.set_backend("cupy")
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"CuPy backend unavailable: {exc}")
    yield module
    backend.set_backend("numpy")


def assert_close(name, on_cpu, on_gpu, tol):
    on_gpu = backend.to_numpy(on_gpu)
    assert on_gpu.dtype == np.asarray(on_cpu).dtype, f"{name}: dtype {on_gpu.dtype} != {np.asarray(on_cpu).dtype}"
    err = rel_error(np.asarray(on_cpu, dtype=np.float64), on_gpu.astype(np.float64))
    assert err <= tol, (f"{name}: rel error {err:.3e} > {tol:.0e}\n numpy: {np.ravel(on_cpu)[:4]}\n"
                        f" cupy:  {np.ravel(on_gpu)[:4]}")


def model_and_params(dtype, fast=False):
    model = build(hidden_size=CONFIG.hidden_size, num_layers=CONFIG.num_layers, num_heads=CONFIG.num_heads,
                  vocab_size=CONFIG.vocab_size, dropout=0.0, max_seq_len=CONFIG.max_seq_len, dtype=dtype, fast=fast)
    return model, model.init(0)


def test_the_stand_in_behaves_as_cupy(cupy):
    """What tests/strict_cupy.py refuses, CuPy refuses (TypeError); what it allows, CuPy allows."""
    for name, operation in strict_cupy.refused(cupy).items():
        with pytest.raises(TypeError):
            operation()
            pytest.fail(f"{name}: CuPy raised no TypeError; tests/strict_cupy.py must allow it too")
    failed = [name for name, operation in strict_cupy.allowed(cupy).items() if operation() is not True]
    assert not failed, f"CuPy does not allow {failed} as tests/strict_cupy.py does"


@pytest.mark.parametrize("fast", [False, True], ids=["reading", "fast"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_forward_and_backward_match_numpy(cupy, dtype, fast):
    model, params = model_and_params(dtype, fast)  # init draws on the host: the same numbers on both backends
    gpu_params = {name: cupy.asarray(p) for name, p in params.items()}
    tokens = bench.synthetic_batch(CONFIG, seed=1).tokens
    logits, cache = model.forward(params, tokens)
    gpu_logits, gpu_cache = model.forward(gpu_params, cupy.asarray(tokens))
    assert type(gpu_logits).__module__.split(".")[0] == "cupy"
    assert_close("logits", logits, gpu_logits, TOLERANCE[dtype])
    dlogits = np.random.default_rng(2).standard_normal(logits.shape).astype(dtype)
    grads = model.backward(dlogits, cache)
    gpu_grads = model.backward(cupy.asarray(dlogits), gpu_cache)
    assert list(gpu_grads) == list(grads)
    for name in grads:
        assert_close(f"grad {name}", grads[name], gpu_grads[name], TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_training_step_matches_numpy(cupy, dtype):
    """bench.NumpyKTOStep: reference and KL forwards, KTO loss, backward, AdamW, on each backend."""
    backend.set_backend("numpy")
    on_cpu = bench.NumpyKTOStep(CONFIG, seed=3, dtype=dtype)
    backend.set_backend("cupy")
    on_gpu = bench.NumpyKTOStep(CONFIG, seed=3, dtype=dtype)
    assert type(on_gpu.params["wte.weight"]).__module__.split(".")[0] == "cupy"
    for step in range(2):
        assert_close(f"loss of step {step}", np.asarray(on_cpu()), np.asarray(on_gpu()), TOLERANCE[dtype])
    for name, param in on_cpu.params.items():
        assert_close(f"{name} after 2 steps", param, on_gpu.params[name], TOLERANCE[dtype])
        assert_close(f"AdamW v of {name}", on_cpu.state["v"][name], on_gpu.state["v"][name], TOLERANCE[dtype])


def test_benchmark_runs_on_cupy(cupy, capsys):
    assert bench.main(["--tiny", "--backend", "cupy", "--repeats", "2", "--no-memory"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny: numpy "), out
    assert backend.get_backend() == "numpy"  # the benchmark puts the default back
