"""The benchmark (kto_np/bench.py, benchmarks/harness.py, benchmarks/bench_step.py): it runs on the tiny
config and prints its lines; its PyTorch side (kto_np.torch_reference) computes the same loss, gradients
and AdamW step as kto_np in float64 (that is what makes the timing comparison fair); its kto_np step is
the training code's; the blocked paths of the speed work give the same numbers as whole arrays."""

import ast
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from kto_np import backend, bench
from kto_np.gradcheck import rel_error

TORCH_SKIP = "torch not installed (pip install 'kto_np[torch]')"
JAX_SKIP = "JAX not installed (pip install 'kto_np[jax]')"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_step.py")
TINY = bench.CONFIGS["tiny"]
harness = bench.load_harness()


def has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def has_jax() -> bool:
    try:
        import jax  # noqa: F401
    except ImportError:
        return False
    return True


def assert_close(name, mine, theirs, tol):
    mine, theirs = np.asarray(mine, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    err = rel_error(mine, theirs)
    assert err <= tol, (f"{name}: rel error {err:.3e} > {tol:.0e}\n kto_np: {np.ravel(mine)[:4]}\n"
                        f" torch:  {np.ravel(theirs)[:4]}")


# ----------------------------------------------------------------------------------------------
# the script, end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("bench") / "RESULTS.md"
    completed = subprocess.run(
        [sys.executable, SCRIPT, "--tiny", "--repeats", "2", "--warmup", "1", "--results", str(results)],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    return completed, results


def test_script_prints_a_line_per_config_and_the_ratio_last(tiny_run):
    completed, _ = tiny_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = completed.stdout.strip().splitlines()
    number = r"\d+\.\d"
    peers = [peer for peer, present in (("torch", has_torch()), ("jax", has_jax())) if present]
    compile_time = rf" \(jax compile {number} s\)"
    times = "".join(rf", {peer} {number} ms, ratio \d+\.\d\d" + (compile_time if peer == "jax" else "")
                    for peer in peers)
    memory = "".join(rf", {peer} {number} MiB" for peer in peers)
    flops = "".join(rf", {peer} {number} GFLOP/s \(\d+%\)" for peer in peers)
    assert len(lines) == 1 + len(peers), completed.stdout
    assert re.fullmatch(rf"tiny: numpy {number} ms{times} \| peak memory numpy {number} MiB{memory} \| "
                        rf"numpy {number} GFLOP/s \(\d+% of peak\){flops}", lines[0]), lines[0]
    for line, peer in zip(lines[1:], peers):
        assert re.fullmatch(rf"ratio numpy/{peer} tiny: \d+\.\d\d", line), line
    if not has_torch():
        assert "torch is not installed" in completed.stderr
    if not has_jax():
        assert "JAX is not installed" in completed.stderr
    assert "[tiny] timing" in completed.stderr  # progress goes to stderr


def test_script_writes_the_results_file(tiny_run):
    completed, results = tiny_run
    assert completed.returncode == 0, completed.stderr[-3000:]
    text = results.read_text()
    assert text.startswith("# Benchmarks: one KTO step")
    for expected in ("- machine: ", "- libraries: Python ", "- BLAS (NumPy): ", "- threads: ",
                     "- load average: ", "float32 matmul peak", "| config | C | L | NH | V | T | B |",
                     "| tiny | 32 | 1 | 2 | 64 | 16 | 2 |"):
        assert expected in text, expected
    assert not [p for p in os.listdir(results.parent) if p.endswith(".tmp")]  # atomic write left nothing


def test_results_append_keeps_earlier_sections(tmp_path):
    path = tmp_path / "RESULTS.md"
    harness.write_results(str(path), "## first\n", append=True)
    harness.write_results(str(path), "## second\n", append=True)
    text = path.read_text()
    assert text.count("# Benchmarks: one KTO step") == 1
    assert text.index("## first") < text.index("## second")
    harness.write_results(str(path), "## third\n", append=False)
    assert "## first" not in path.read_text() and "## third" in path.read_text()


@pytest.mark.parametrize(("argv", "match"), [
    (["--configs", "huge"], "--configs"),
    (["--configs", ""], "--configs"),
    (["--tiny", "--repeats", "0"], "--repeats"),
    (["--tiny", "--warmup", "-1"], "--warmup"),
    (["--tiny", "--threads", "0"], "--threads"),
    (["--tiny", "--append"], "--append"),
    (["--tiny", "--seed", "-1"], "--seed"),
    (["--tiny", "--results", "/nonexistent-folder/RESULTS.md"], "--results"),
    (["--tiny", "--results", ""], "--results"),
])
def test_bad_options_exit_2_naming_the_option(capsys, argv, match):
    assert bench.main(argv) == 2
    assert match in capsys.readouterr().err


def test_outside_a_source_checkout_the_entry_point_says_where_the_harness_is(monkeypatch, capsys, tmp_path):
    missing = str(tmp_path / "benchmarks" / "harness.py")
    monkeypatch.setattr(bench, "harness_path", lambda: missing)
    monkeypatch.delitem(sys.modules, "kto_np_benchmarks_harness")
    assert bench.main(["--tiny", "--no-memory"]) == 2
    err = capsys.readouterr().err
    assert "source checkout" in err and missing in err


def test_the_package_side_of_the_benchmark_imports_no_tool_above_it():
    """kto_np/bench.py, kto_np/torch_reference.py and kto_np/jax_reference.py: no import of the CLI (no
    cli <-> bench cycle), and torch and JAX only inside functions."""
    for name in ("bench.py", "torch_reference.py", "jax_reference.py"):
        with open(os.path.join(REPO, "kto_np", name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        imported = set()
        for node in tree.body:  # module level only: lazy imports sit inside functions
            if isinstance(node, ast.ImportFrom):
                imported |= {f"{node.module or ''}.{a.name}".lstrip(".") for a in node.names}
                imported.add(node.module or "")
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        parts = {part for n in imported for part in n.split(".")}
        assert not parts & {"cli", "torch", "jax"}, (name, sorted(imported))


@pytest.mark.parametrize("package, module, require, says, extra", [
    ("torch", "torch_reference", "require_torch", "needs PyTorch", ".[torch]"),
    ("jax", "jax_reference", "require_jax", "needs JAX", ".[jax]"),
])
def test_a_peer_imports_without_its_package_and_says_how_to_install_it(package, module, require, says, extra):
    code = (f"import sys; sys.modules[{package!r}] = None\n"
            f"from kto_np import {module}\n"
            f"try:\n    {module}.{require}()\n"
            "except ImportError as exc:\n    print(exc)\n")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": REPO}, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert says in completed.stdout and extra in completed.stdout, completed.stdout


def test_cupy_backend_without_a_gpu_is_an_error(capsys):
    try:
        backend.set_backend("cupy")
    except (ImportError, RuntimeError):
        pass
    else:
        backend.set_backend("numpy")
        pytest.skip("CuPy and a GPU are present: tests/test_cupy.py covers the cupy backend")
    assert bench.main(["--tiny", "--backend", "cupy", "--no-memory"]) == 2
    assert capsys.readouterr().err.startswith("bench: error: --backend cupy is not available")
    assert backend.get_backend() == "numpy"


def test_memory_probe_measures_the_step_in_a_fresh_process():
    small = bench.CONFIGS["small"]
    peak = harness.measure_memory("numpy", small, "numpy", threads=1)
    params = bench.NumpyKTOStep(small).model.num_params()
    # at least the policy, reference, two AdamW moments and the gradients (float32), far below a GiB
    assert 5 * 4 * params <= peak < 2**30, f"peak {peak / 2**20:.1f} MiB for {params} parameters"


# ----------------------------------------------------------------------------------------------
# what is timed: the same computation on both sides


def test_synthetic_batch_shapes_masks_and_kl_rotation():
    config = bench.CONFIGS["small"]
    batch = bench.synthetic_batch(config, seed=3)
    B, T = config.batch_size, config.seq_len
    prompt_len = T // 4
    assert batch.tokens.shape == batch.kl_tokens.shape == (B, T)
    assert batch.completion_mask.dtype == np.float32
    assert batch.labels.tolist() == [1, 0] * (B // 2)
    for b in range(B):
        n = int(batch.completion_mask[b].sum())
        assert batch.completion_mask[b, :prompt_len].sum() == 0 and T // 2 <= n <= T - prompt_len
        np.testing.assert_array_equal(batch.completion_mask[b, prompt_len:prompt_len + n], 1.0)
        assert np.all(batch.tokens[b, prompt_len + n:] == 0) and np.all(batch.tokens[b, :prompt_len + n] > 0)
        previous = (b - 1) % B  # KL row b: prompt b + completion b - 1
        n_previous = int(batch.completion_mask[previous].sum())
        np.testing.assert_array_equal(batch.kl_tokens[b, :prompt_len], batch.tokens[b, :prompt_len])
        np.testing.assert_array_equal(batch.kl_tokens[b, prompt_len:prompt_len + n_previous],
                                      batch.tokens[previous, prompt_len:prompt_len + n_previous])
        np.testing.assert_array_equal(batch.kl_completion_mask[b], batch.completion_mask[previous])


def test_step_flops_counts_every_matrix_product():
    config = bench.CONFIGS["medium"]
    B, T, C, V, NH, L = (config.batch_size, config.seq_len, config.hidden_size, config.vocab_size,
                         config.num_heads, config.num_layers)
    HS = C // NH
    products = [(B * T, C, 3 * C), (B * T, C, C), (B * T, C, 4 * C), (B * T, 4 * C, C)] * L  # (m, k, n)
    products += [(T, HS, T), (T, T, HS)] * (L * B * NH)  # q k^T and probs v per head
    products += [(B * T, C, V)]  # the head
    forward = sum(2 * m * k * n for m, k, n in products)
    assert bench.step_flops(config) == 6 * forward


def test_scored_step_flops_counts_the_kept_positions_and_the_scored_heads_products():
    """kto_np's fast step runs each row to its last scored position (packed) and the head at the scored
    positions: the products recounted here product by product, row by row (as the dense count above),
    the matched rows in 4 passes (two forwards, a backward of two), the KL rows in 2. (What the step
    itself runs is tested in test_step.py; this checks the count's arithmetic, and the band against the
    dense count.)"""
    config = bench.CONFIGS["small"]
    batch = bench.synthetic_batch(config)
    C, V, L, NH = config.hidden_size, config.vocab_size, config.num_layers, config.num_heads
    HS = C // NH

    def one_pass(mask):
        total = 0
        for row in np.asarray(mask):
            scored = np.flatnonzero(row[1:])  # t whose logits score token t + 1
            if scored.size == 0:
                continue
            n = int(scored[-1]) + 1  # positions 0..last scored
            products = [(n, C, 3 * C), (n, C, C), (n, C, 4 * C), (n, 4 * C, C)] * L
            products += [(n, HS, n), (n, n, HS)] * (L * NH)
            products += [(scored.size, C, V)]
            total += sum(2 * m * k * p for m, k, p in products)
        return total

    counted = 4 * one_pass(batch.completion_mask) + 2 * one_pass(batch.kl_completion_mask)
    assert bench.scored_step_flops(config, batch) == counted
    assert 0.6 * bench.step_flops(config) < counted < 0.95 * bench.step_flops(config)


def test_torch_twin_gives_the_same_loss_gradients_and_adamw_step():
    """float64: the benchmark's PyTorch implementation against kto_np, tensor by tensor."""
    torch = pytest.importorskip("torch", reason=TORCH_SKIP)
    numpy_step = bench.NumpyKTOStep(TINY, seed=1, dtype="float64")
    torch_step = bench.TorchKTOStep(numpy_step)
    assert all(t.dtype == torch.float64 for t in torch_step.params.values())
    with torch.no_grad():  # the KL rows set z_ref > 0 here, so the KL path is exercised
        kl_policy = torch_step._logps(torch_step.params, torch_step.kl_tokens, torch_step.kl_mask)
        kl_ref = torch_step._logps(torch_step.ref_params, torch_step.kl_tokens, torch_step.kl_mask)
    assert float((kl_policy - kl_ref).mean()) > 0

    loss, grads = numpy_step.loss_and_grads()
    torch_loss = torch_step.loss()
    torch_loss.backward()
    assert_close("loss", loss, float(torch_loss.detach()), 1e-12)
    for name, grad in grads.items():
        assert_close(f"grad {name}", grad, torch_step.params[name].grad.numpy(), 1e-9)

    numpy_loss, torch_loss = numpy_step(), torch_step()  # one full step each, AdamW included
    assert_close("loss of the full step", numpy_loss, torch_loss, 1e-12)
    for name, param in numpy_step.params.items():
        assert_close(f"{name} after AdamW", param, torch_step.params[name].detach().numpy(), 1e-9)


def test_torch_twin_float32_stays_close():
    torch = pytest.importorskip("torch", reason=TORCH_SKIP)
    numpy_step = bench.NumpyKTOStep(bench.CONFIGS["small"], seed=1)
    torch_step = bench.TorchKTOStep(numpy_step)
    assert all(t.dtype == torch.float32 for t in torch_step.params.values())
    steps = 2
    for _ in range(steps):
        assert_close("float32 loss", numpy_step(), torch_step(), 1e-5)
    # AdamW moves each entry by about lr per step whatever the gradient's size, so float32 rounding
    # noise in a zero gradient (the key bias) may move it either way: compare to that scale
    bound = 2 * steps * bench.HYPER["lr"]
    for name, param in numpy_step.params.items():
        assert param.dtype == np.float32, name
        np.testing.assert_allclose(param, torch_step.params[name].detach().numpy(), rtol=1e-4, atol=bound,
                                   err_msg=name)


def test_jax_twin_gives_the_same_steps_in_float32():
    """The JAX side (one jax.jit of the whole step) against kto_np: the loss of each step and the weights
    after AdamW, float32 (JAX's default precision)."""
    pytest.importorskip("jax", reason=JAX_SKIP)
    numpy_step = bench.NumpyKTOStep(TINY, seed=1)
    jax_step = bench.JaxKTOStep(numpy_step)
    assert jax_step.compile_seconds > 0
    steps = 3
    for _ in range(steps):
        assert_close("float32 loss", numpy_step(), jax_step(), 1e-5)
    bound = 2 * steps * bench.HYPER["lr"]  # as for the torch twin: AdamW moves a zero gradient's entry by ~lr
    for name, param in numpy_step.params.items():
        mine = np.asarray(jax_step.params[name])
        assert mine.dtype == np.float32, name
        np.testing.assert_allclose(param, mine, rtol=1e-4, atol=bound, err_msg=name)


def result(name, numpy_ms, torch_ms=None, jax_ms=None, numpy_mib=None, torch_mib=None):
    config = bench.CONFIGS[name]

    def mib(value):
        return None if value is None else int(value * 2**20)

    return harness.ConfigResult(config, 3, numpy_ms / 1e3, None if torch_ms is None else torch_ms / 1e3,
                                mib(numpy_mib), mib(torch_mib), bench.step_flops(config),
                                None if jax_ms is None else jax_ms / 1e3, None if jax_ms is None else 1.0, None)


def test_targets_say_met_or_by_how_much_they_are_missed():
    seed = result("seed", 1000.0, torch_ms=1000.0, jax_ms=2000.0, numpy_mib=900, torch_mib=1000)
    small = result("small", 40.0, torch_ms=50.0)
    peak = bench.step_flops(bench.CONFIGS["seed"]) / 1.0 / 1e9 / 0.5  # the seed step runs at 50 % of it
    lines = harness.target_lines([small, seed], peak)
    assert lines == [
        "small: numpy/torch 0.80 (target <= 0.8): met",
        "seed: numpy/torch 1.00 (target <= 0.6): missed by 67% (needs 1.67x faster)",
        "seed: numpy/jax 0.50 (target <= 0.6): met",
        "seed: kto_np at 50% of the sgemm peak (target >= 80%): missed by 30% points (needs 1.60x faster)",
        "seed: peak memory 900.0 MiB vs torch 1000.0 MiB (target <= torch): met",
    ]
    section = harness.format_results_markdown([small, seed], {
        "date": "d", "backend": "b", "torch_device": "t", "command": "c", "cpu": "cpu", "cores": 2, "memory": "m",
        "platform": "p", "versions": "v", "blas": "bl", "threads": 2, "threads_source": "s", "torch_threads": 2,
        "fast_threads": 2, "jax_threads": "j", "environment": "e", "load": "l", "numpy_gflops": peak,
        "torch_gflops": None, "peak_gflops": peak, "warmup": 1})
    assert "| seed | 512 | 6 | 8 | 32000 | 256 | 4 | 3 | 1000.0 | 1000.0 | 1.00 | 2000.0 | 0.50 | 1.0 |" in section
    assert "Targets (issue 23):" in section and "- seed: numpy/jax 0.50 (target <= 0.6): met" in section
