"""The benchmark harness around kto_np.bench's training steps (kto_np, PyTorch eager, JAX jit): the machine
(threads, BLAS, matmul peak, load), interleaved timing, the peak-memory probe (a fresh process per side),
the targets and the RESULTS.md writer. Not part of the installed package: it runs from a source checkout, through

    python benchmarks/bench_step.py --configs small,medium,seed --results benchmarks/RESULTS.md
    kto-np bench --tiny            (kto_np.bench.run_from_args loads this file)

kto_np/bench.py holds what is timed (the configs, the synthetic batch, NumpyKTOStep, TorchKTOStep on
kto_np.torch_reference) and the options; this file only measures and reports.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

import numpy as np

from kto_np import __version__, backend
from kto_np.bench import (
    CONFIGS,
    DEFAULT_REPEATS,
    BenchConfig,
    JaxKTOStep,
    NumpyKTOStep,
    TorchKTOStep,
    scored_step_flops,
    step_flops,
)
from kto_np.fast import threads as fast_threads
from kto_np.files import atomic_write

MEMORY_STEPS = 3
MATMUL_SIZE = 2048

# The targets: kto_np's time over each peer's at most this (per config, default "other"), kto_np
# at least this share of the sgemm peak (seed), peak memory at most PyTorch's.
TARGET_RATIO = {"small": 0.8, "other": 0.6}
TARGET_PEAK_SHARE = {"seed": 0.8}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# the machine: threads, BLAS, matmul peak


def _numpy_blas_pools() -> list[dict]:
    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415
    except ImportError:
        return []
    pools = [info for info in threadpool_info() if info.get("user_api") == "blas"]
    numpy_pools = [info for info in pools if "numpy" in info.get("filepath", "")]
    return numpy_pools or pools


def blas_threads() -> tuple[int, str]:
    """(threads of NumPy's BLAS, where the number comes from): threadpoolctl if installed, else
    OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS, else os.cpu_count()."""
    pools = _numpy_blas_pools()
    if pools:
        return int(pools[0]["num_threads"]), "threadpoolctl"
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value), var
    return os.cpu_count() or 1, "os.cpu_count()"


def limit_blas_threads(threads: int):
    """A context manager running NumPy's BLAS on `threads` threads (needs threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits  # noqa: PLC0415
    except ImportError as exc:
        raise ValueError("--threads needs threadpoolctl (pip install threadpoolctl), or set "
                         "OPENBLAS_NUM_THREADS / OMP_NUM_THREADS before starting Python") from exc
    return threadpool_limits(limits=threads, user_api="blas")


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def busy_cores(seconds: float = 0.5) -> float | None:
    """Cores kept busy by other processes right now (from /proc/stat over `seconds`; we sleep)."""
    def cpu_times():
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values), idle

    try:
        total_0, idle_0 = cpu_times()
        time.sleep(seconds)
        total_1, idle_1 = cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    if total_1 == total_0:
        return None
    return (1.0 - (idle_1 - idle_0) / (total_1 - total_0)) * (os.cpu_count() or 1)


def blas_description() -> str:
    pools = _numpy_blas_pools()
    if pools:
        info = pools[0]
        return (f"{info.get('internal_api')} {info.get('version')}, kernel {info.get('architecture')}, "
                f"{info.get('num_threads')} threads ({os.path.basename(info.get('filepath', ''))}, threadpoolctl)")
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')} (numpy.show_config; install threadpoolctl for the kernel)"
    except Exception:  # noqa: BLE001  (show_config's layout varies between NumPy versions)
        return "unknown (install threadpoolctl)"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_gflops(matmul, make, size: int = MATMUL_SIZE, repeats: int = 3) -> float:
    """Best GFLOP/s of a float32 [size, size] @ [size, size] product (2 size^3 operations)."""
    a, b = make(size)
    matmul(a, b)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


# ----------------------------------------------------------------------------------------------
# timing and memory


def _synchronizer(side: str, backend_name: str):
    if backend_name != "cupy":
        return lambda: None
    if side == "numpy":
        module = backend.xp()
        return lambda: module.cuda.Device().synchronize()
    import torch  # noqa: PLC0415

    return torch.cuda.synchronize


def time_interleaved(steps: dict, synchronize: dict, repeats: int, warmup: int) -> dict:
    """Median seconds per call of each step, run alternately (the order flips every repeat)."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
        synchronize[name]()
    times = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            gc.collect()
            start = time.perf_counter()
            steps[name]()
            synchronize[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _proc_status_bytes(field: str) -> int | None:
    """A memory line of /proc/self/status (Linux) in bytes, e.g. VmRSS (now) or VmHWM (peak)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Set the peak RSS (VmHWM) to the current RSS: write 5 to /proc/self/clear_refs (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """Peak RSS of this process. VmHWM where available: getrusage's ru_maxrss survives exec, so in a
    child started by a large parent it starts at the parent's size."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource  # noqa: PLC0415  (Unix only; the CLI must import on any system)

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # KiB on Linux


def memory_probe_main(argv: list[str]) -> int:
    """In a fresh process: peak memory of a few steps of one side only; prints one JSON line.

    argv: side ("numpy" | "torch" | "jax"), config JSON, steps, backend ("numpy" | "cupy"), threads.
    CPU: the peak RSS (VmHWM, reset first) during the steps minus the RSS before the model is built:
    parameters, reference, AdamW state, activations, gradients and what the allocator keeps. Both
    sides first run one tiny step and a 512^3 product, so that neither counts its libraries'
    one-time set-up (thread pools, BLAS buffers). JAX: the peak is reset again after the step is
    compiled, so that the compiler's own memory is not counted (the parameters and state are). GPU:
    CuPy's pool size, torch.cuda.max_memory_allocated.
    """
    side, config_json, steps, backend_name, threads = argv
    config, steps, threads = BenchConfig(**json.loads(config_json)), int(steps), int(threads)
    backend.set_backend(backend_name)
    if blas_threads()[0] != threads:
        limit_blas_threads(threads)  # kept for the life of this process
    device = "cuda" if backend_name == "cupy" else "cpu"

    fast_threads.set_threads(threads)

    def make_step(step_config):
        numpy_step = NumpyKTOStep(step_config)
        if side == "numpy":
            return numpy_step
        if side == "jax":
            step = JaxKTOStep(numpy_step)  # copies the weights: the NumPy side's are dropped
            del numpy_step
            gc.collect()
            return step
        return TorchKTOStep(numpy_step, device=device, share_memory=True)  # shares (CPU) or copies (GPU)

    if side == "torch":
        import torch  # noqa: PLC0415

        torch.set_num_threads(threads)
    make_step(CONFIGS["tiny"])()
    square = np.ones((512, 512), dtype=np.float32)  # BLAS sets up its per-thread buffers on a large product
    square @ square.T
    if side == "torch":
        torch.from_numpy(square) @ torch.from_numpy(square).T
    del square
    gc.collect()
    before = _proc_status_bytes("VmRSS") if _reset_peak_rss() else _peak_rss_bytes()
    step = make_step(config)
    if side == "jax":
        _reset_peak_rss()
    if backend_name == "cupy":
        if side == "torch":
            torch.cuda.reset_peak_memory_stats()
        else:
            backend.xp().get_default_memory_pool().free_all_blocks()
    for _ in range(steps):
        step()
    if backend_name == "cupy":
        peak = (torch.cuda.max_memory_allocated() if side == "torch"
                else backend.xp().get_default_memory_pool().total_bytes())
        print(json.dumps({"peak_bytes": int(peak), "measure": "gpu"}))
    else:
        # never below 0: memory that the set-up had taken and gave back (JAX's compiler) can leave the peak
        # of a small step under the RSS measured before it
        print(json.dumps({"peak_bytes": max(0, _peak_rss_bytes() - before), "measure": "rss"}))
    return 0


def measure_memory(side: str, config: BenchConfig, backend_name: str, threads: int,
                   steps: int = MEMORY_STEPS) -> int | None:
    """Peak memory in bytes of `side` alone in a subprocess (memory_probe_main), or None on failure."""
    import kto_np  # noqa: PLC0415

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(kto_np.__file__)))  # this kto_np
    env = dict(os.environ)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # a fresh process: the BLAS thread count can be set before NumPy loads (no threadpoolctl needed)
    env.update({var: str(threads) for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    if side == "jax":
        env["XLA_FLAGS"] = _xla_flags(threads, env.get("XLA_FLAGS", ""))
    code = ("import sys; from kto_np.bench import load_harness; "
            "sys.exit(load_harness().memory_probe_main(sys.argv[1:]))")
    command = [sys.executable, "-c", code, side, json.dumps(config._asdict()), str(steps), backend_name,
               str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        _log(f"memory probe ({side}, {config.name}) failed:\n{result.stderr.strip()[-2000:]}")
        return None
    return int(json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"])


# ----------------------------------------------------------------------------------------------
# the run


class ConfigResult(NamedTuple):
    config: BenchConfig
    repeats: int
    numpy_seconds: float
    torch_seconds: float | None
    numpy_peak_bytes: int | None
    torch_peak_bytes: int | None
    flops: int  # the dense step's matrix products (what the peers compute)
    jax_seconds: float | None = None
    jax_compile_seconds: float | None = None
    jax_peak_bytes: int | None = None
    profile: list | None = None  # profile_by_op's rows (--profile)
    numpy_flops: int | None = None  # the products kto_np computes (kept positions, the head where scored)


def _numpy_gflops(result: ConfigResult) -> float:
    """kto_np's rate of matrix products: the ones it computes (fewer than the dense step's)."""
    flops = result.flops if result.numpy_flops is None else result.numpy_flops
    return flops / result.numpy_seconds / 1e9


def _cores(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2f}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


def _ratio(result: ConfigResult, peer: str = "torch") -> float | None:
    seconds = result.torch_seconds if peer == "torch" else result.jax_seconds
    return None if seconds is None else result.numpy_seconds / seconds


def format_result_line(result: ConfigResult, peak_gflops: float) -> str:
    config = result.config
    numpy_gflops = _numpy_gflops(result)
    parts = [f"{config.name}: numpy {result.numpy_seconds * 1e3:.1f} ms"]
    if result.torch_seconds is not None:
        parts[0] += f", torch {result.torch_seconds * 1e3:.1f} ms, ratio {_ratio(result):.2f}"
    if result.jax_seconds is not None:
        parts[0] += (f", jax {result.jax_seconds * 1e3:.1f} ms, ratio {_ratio(result, 'jax'):.2f} "
                     f"(jax compile {result.jax_compile_seconds:.1f} s)")
    parts.append(f"peak memory numpy {_mib(result.numpy_peak_bytes)}"
                 + ("" if result.torch_seconds is None else f", torch {_mib(result.torch_peak_bytes)}")
                 + ("" if result.jax_seconds is None else f", jax {_mib(result.jax_peak_bytes)}"))
    flops_part = f"numpy {numpy_gflops:.1f} GFLOP/s ({numpy_gflops / peak_gflops:.0%} of peak)"
    for peer, seconds in (("torch", result.torch_seconds), ("jax", result.jax_seconds)):
        if seconds is not None:
            gflops = result.flops / seconds / 1e9
            flops_part += f", {peer} {gflops:.1f} GFLOP/s ({gflops / peak_gflops:.0%})"
    parts.append(flops_part)
    return " | ".join(parts)


def target_lines(results: list[ConfigResult], peak_gflops: float) -> list[str]:
    """The issue's targets, one line each: met, or missed and by how much."""
    lines = []
    for r in results:
        name = r.config.name
        if name == "tiny":
            continue
        limit = TARGET_RATIO.get(name, TARGET_RATIO["other"])
        for peer in ("torch", "jax"):
            ratio = _ratio(r, peer)
            if ratio is not None:
                verdict = ("met" if ratio <= limit
                           else f"missed by {ratio / limit - 1:.0%} (needs {ratio / limit:.2f}x faster)")
                lines.append(f"{name}: numpy/{peer} {ratio:.2f} (target <= {limit}): {verdict}")
        if name in TARGET_PEAK_SHARE:
            share, goal = _numpy_gflops(r) / peak_gflops, TARGET_PEAK_SHARE[name]
            verdict = ("met" if share >= goal
                       else f"missed by {goal - share:.0%} points (needs {goal / share:.2f}x faster)")
            lines.append(f"{name}: kto_np at {share:.0%} of the sgemm peak (target >= {goal:.0%}): {verdict}")
        if r.numpy_peak_bytes is not None and r.torch_peak_bytes is not None:
            verdict = "met" if r.numpy_peak_bytes <= r.torch_peak_bytes else "missed"
            lines.append(f"{name}: peak memory {_mib(r.numpy_peak_bytes)} vs torch {_mib(r.torch_peak_bytes)} "
                         f"(target <= torch): {verdict}")
    return lines


def _versions(torch_module, jax_module=None) -> str:
    parts = [f"Python {platform.python_version()}", f"NumPy {np.__version__}", f"kto_np {__version__}"]
    if torch_module is not None:
        parts.append(f"torch {torch_module.__version__}")
    if jax_module is not None:
        parts.append(f"jax {jax_module.__version__}")
    if backend.get_backend() == "cupy":
        parts.append(f"CuPy {backend.xp().__version__}")
    return ", ".join(parts)


def _memory_total() -> str:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            kib = int(f.readline().split()[1])
        return f"{kib / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        return "unknown"


def format_results_markdown(results: list[ConfigResult], info: dict) -> str:
    """A RESULTS.md section: the machine, the libraries, then one table row per config."""
    lines = [
        f"## {info['date']}: {info['backend']} against {info['torch_device']}",
        "",
        f"- command: `{info['command']}`",
        f"- machine: {info['cpu']}, {info['cores']} logical cores, {info['memory']} memory; {info['platform']}",
        f"- libraries: {info['versions']}",
        f"- BLAS (NumPy): {info['blas']}",
        f"- threads: {info['threads']} for every side ({info['threads_source']}); "
        f"torch.get_num_threads() = {info['torch_threads']}; kto_np's fast room: {info['fast_threads']} "
        f"(kto_np.fast.threads); JAX: {info['jax_threads']}",
        f"- environment: {info['environment']}",
        f"- load average: {info['load']}",
        f"- float32 matmul peak ({MATMUL_SIZE}^3 sgemm, best of 3): NumPy {info['numpy_gflops']:.1f} GFLOP/s"
        + ("" if info["torch_gflops"] is None else f", torch {info['torch_gflops']:.1f} GFLOP/s")
        + f"; peak used below: {info['peak_gflops']:.1f} GFLOP/s",
        f"- repeats: median of the timed steps after {info['warmup']} warm-up step(s) per side, "
        "the two sides interleaved; memory: peak RSS rise of "
        f"{MEMORY_STEPS} steps of one side alone in a fresh process",
        "",
        "| config | C | L | NH | V | T | B | repeats | numpy ms | torch ms | numpy/torch | jax ms | numpy/jax | "
        "jax compile s | numpy peak | torch peak | jax peak | numpy GFLOP/s | torch GFLOP/s | jax GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.config
        numpy_gflops = _numpy_gflops(r)
        peak = info["peak_gflops"]
        def ms(seconds):
            return "n/a" if seconds is None else f"{seconds * 1e3:.1f}"

        def gflops(seconds, r=r, peak=peak):
            return "n/a" if seconds is None else f"{r.flops / seconds / 1e9:.1f} ({r.flops / seconds / 1e9 / peak:.0%})"

        def ratio(peer, r=r):
            value = _ratio(r, peer)
            return "n/a" if value is None else f"{value:.2f}"

        compile_s = "n/a" if r.jax_compile_seconds is None else f"{r.jax_compile_seconds:.1f}"
        lines.append(
            f"| {c.name} | {c.hidden_size} | {c.num_layers} | {c.num_heads} | {c.vocab_size} | {c.seq_len} | "
            f"{c.batch_size} | {r.repeats} | {ms(r.numpy_seconds)} | {ms(r.torch_seconds)} | {ratio('torch')} | "
            f"{ms(r.jax_seconds)} | {ratio('jax')} | {compile_s} | {_mib(r.numpy_peak_bytes)} | "
            f"{_mib(r.torch_peak_bytes)} | {_mib(r.jax_peak_bytes)} | {numpy_gflops:.1f} ({numpy_gflops / peak:.0%}) | "
            f"{gflops(r.torch_seconds)} | {gflops(r.jax_seconds)} |")
    targets = target_lines(results, info["peak_gflops"])
    if targets:
        lines += ["", "Targets (issue 23):", ""] + [f"- {line}" for line in targets]
    for r in results:
        if r.profile:
            lines += [""] + format_profile(r.config.name, r.profile)
    lines += [
        "",
        "One step: reference forward (matched and KL rows) and policy forward on the KL rows without "
        "gradient, policy forward + backward on the matched rows, KTO loss (variant kto), AdamW "
        "(lr 1e-4, wd 0.01 on matrices). float32, dropout 0 on every side. PyTorch: eager "
        "(kto_np.torch_reference); JAX: the whole step as one jax.jit (kto_np.jax_reference), compiled ahead "
        "of time (the compile column), not counted in its step time. GFLOP/s counts matrix "
        "products only (6 forward-equivalents per step); the percentage is of the matmul peak above. "
        "kto_np runs each row only to its last scored position (kto_np.fast.packed) and computes the head's "
        "logits only at the positions that score a completion token (kto_np.fast.head); the peers, as TRL, "
        "run every position of the padded batch: kto_np's GFLOP/s and peak share count the products it "
        "computes" + "".join(
            f"{', ' if i else ': '}{r.numpy_flops / r.flops:.0%} of the dense step's at {r.config.name}"
            for i, r in enumerate(r for r in results if r.numpy_flops is not None)) + ".",
        "",
    ]
    return "\n".join(lines)


RESULTS_HEADER = """# Benchmarks: one KTO step, kto_np against PyTorch eager and JAX jit

Generated by `python benchmarks/bench_step.py --results benchmarks/RESULTS.md` (benchmarks/harness.py);
do not edit by hand. Each section is one run; `--append` adds a section.

"""


def write_results(path: str, section: str, append: bool) -> None:
    previous = ""
    if append and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            previous = f.read()
    text = (previous.rstrip("\n") + "\n\n" + section) if previous else RESULTS_HEADER + section
    with atomic_write(path, "w") as f:
        f.write(text)


# Where a kto_np step's time goes: (module, function, category). Each function's time is counted
# without the wrapped functions it calls (exclusive), so the categories add up to the step.
PROFILE_OPS = [
    ("kto_np.fast.layers", "linear_forward", "matmul: linear layers (+ bias)"),
    ("kto_np.fast.layers", "linear_backward", "matmul: linear layers (+ bias)"),
    ("kto_np.fast.layers", "attention_forward", "matmul: attention heads (+ head copies)"),
    ("kto_np.fast.layers", "attention_backward", "matmul: attention heads (+ head copies)"),
    ("kto_np.fast.packed", "attention_forward", "matmul: attention heads (+ head copies)"),
    ("kto_np.fast.packed", "attention_backward", "matmul: attention heads (+ head copies)"),
    ("kto_np.fast.head", "head_logprobs_forward", "matmul: the head at the scored positions"),
    ("kto_np.fast.head", "head_logprobs_backward", "matmul: the head at the scored positions"),
    ("kto_np.model", "GPT._forward", "matmul: the head at every position (dense path)"),
    ("kto_np.model", "GPT._backward", "matmul: the head at every position (dense path)"),
    ("kto_np.model", "GPT.body_forward", "embeddings (lookup, gradient)"),  # the full rows (dropout)
    ("kto_np.model", "GPT.body_backward", "embeddings (lookup, gradient)"),
    ("kto_np.fast.packed", "body_forward", "embeddings (lookup, gradient)"),
    ("kto_np.fast.packed", "body_backward", "embeddings (lookup, gradient)"),
    ("kto_np.fast.packed", "row_spans", "embeddings (lookup, gradient)"),
    ("kto_np.fast.layers", "_softmax_in_place", "elementwise: softmax"),
    ("kto_np.fast.layers", "_softmax_backward_in_place", "elementwise: softmax"),
    ("kto_np.fast.layers", "gelu_forward", "elementwise: GELU"),
    ("kto_np.fast.layers", "gelu_backward", "elementwise: GELU"),
    ("kto_np.fast.layers", "layernorm_forward", "elementwise: LayerNorm"),
    ("kto_np.fast.layers", "layernorm_backward", "elementwise: LayerNorm"),
    ("kto_np.model", "block_forward", "elementwise: residual adds"),
    ("kto_np.model", "block_backward", "elementwise: residual adds"),
    ("kto_np.fast.logprobs", "logprobs_forward", "log-softmax over the vocabulary"),
    ("kto_np.fast.logprobs", "_logprobs_backward_into", "log-softmax over the vocabulary"),
    ("kto_np.fast.head", "_logsumexp_last", "log-softmax over the vocabulary"),
    ("kto_np.fast.head", "_logprobs_backward_into", "log-softmax over the vocabulary"),
    ("kto_np.bench", "adamw_step", "optimizer: AdamW"),
    ("kto_np.step", "check_finite", "guards (the doors' checks) and glue"),
    ("kto_np.step", "_check_kto_step", "guards (the doors' checks) and glue"),
    ("kto_np.bench", "reference_logps", "guards (the doors' checks) and glue"),
    ("kto_np.bench", "kto_step", "guards (the doors' checks) and glue"),
]


def profile_by_op(step, steps: int = 2) -> list[tuple[str, float, float]]:
    """[(category, seconds per step, share of the step's wall time)] of `steps` calls of a kto_np step,
    largest first, the rest of the step last ("other"). The functions of PROFILE_OPS are wrapped for
    the calls (and restored), each timed without the wrapped functions it calls."""
    import importlib  # noqa: PLC0415

    totals: dict = {}
    stack: list = []
    restore = []

    def wrap(owner, name, category):
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            stack.append(0.0)
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                inner = stack.pop()
                totals[category] = totals.get(category, 0.0) + elapsed - inner
                if stack:
                    stack[-1] += elapsed

        setattr(owner, name, timed)
        restore.append((owner, name, original))

    try:
        for module_name, qualified, category in PROFILE_OPS:
            owner = importlib.import_module(module_name)
            *classes, name = qualified.split(".")
            for class_name in classes:
                owner = getattr(owner, class_name)
            wrap(owner, name, category)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
    finally:
        for owner, name, original in reversed(restore):
            setattr(owner, name, original)
    rows = sorted(((c, t / steps, t / steps / wall) for c, t in totals.items()), key=lambda row: -row[1])
    other = wall - sum(t for _, t, _ in rows)
    return rows + [("other (the step outside the ops above)", other, other / wall)]


def format_profile(name: str, rows) -> list[str]:
    wall = sum(t for _, t, _ in rows)
    lines = [f"Where a kto_np {name} step's {wall * 1e3:.0f} ms go (exclusive time per op, --profile):", "",
             "| op | ms per step | share |", "|---|---|---|"]
    return lines + [f"| {category} | {seconds * 1e3:.1f} | {share:.1%} |" for category, seconds, share in rows]


def _profile_numpy_step(step: NumpyKTOStep, steps: int = 3, top: int = 25) -> None:
    import cProfile  # noqa: PLC0415
    import io  # noqa: PLC0415
    import pstats  # noqa: PLC0415

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    _log(stream.getvalue())


def _import_torch(backend_name: str):
    """(torch or None, device, reason when None)."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return None, None, "torch is not installed (pip install 'kto_np[torch]')"
    if backend_name == "cupy":
        if not torch.cuda.is_available():
            return None, None, "torch has no CUDA device"
        return torch, "cuda", None
    return torch, "cpu", None


def _xla_flags(threads: int, flags: str) -> str:
    """XLA_FLAGS that keep JAX's CPU computations on one thread when threads == 1 (else as they are)."""
    if threads != 1 or "intra_op_parallelism_threads" in flags:
        return flags
    return (flags + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()


def _import_jax(backend_name: str, threads: int):
    """(jax or None, reason when None). Only next to the NumPy backend (JAX on the CPU)."""
    if backend_name != "numpy":
        return None, "JAX is compared on the CPU only (--backend numpy)"
    if "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = _xla_flags(threads, os.environ.get("XLA_FLAGS", ""))
    try:
        import jax  # noqa: PLC0415
    except ImportError:
        return None, "JAX is not installed (pip install 'kto_np[jax]')"
    return jax, None


def run(args: argparse.Namespace, configs: list[BenchConfig]) -> int:
    """Run the benchmark on `configs` with the options `args` (kto_np.bench checked both). Exit code."""
    try:
        backend.set_backend(args.backend)
    except (ImportError, RuntimeError) as exc:
        print(f"skipped: backend {args.backend} is not available ({exc})")
        return 0
    try:
        if args.threads is not None and args.threads != blas_threads()[0]:
            try:
                limits = limit_blas_threads(args.threads)
            except ValueError as exc:
                print(f"bench: error: {exc}", file=sys.stderr)
                return 2
            with limits:
                return _run(args, configs, threads_source="--threads")
        return _run(args, configs)
    finally:
        backend.set_backend("numpy")


def _run(args: argparse.Namespace, configs: list[BenchConfig], threads_source: str | None = None) -> int:
    threads, source = blas_threads()
    threads_source = threads_source or source
    blas = blas_description()
    load_at_start = load_average()
    busy_at_start = busy_cores()
    torch, torch_device, no_torch_reason = (None, None, "--no-torch") if args.no_torch else _import_torch(args.backend)
    if torch is None:
        _log(f"no PyTorch side: {no_torch_reason}")
    else:
        torch.set_num_threads(threads)
    jax, no_jax_reason = (None, "--no-jax") if args.no_jax else _import_jax(args.backend, threads)
    if jax is None:
        _log(f"no JAX side: {no_jax_reason}")
    if not os.environ.get(fast_threads.ENV_VAR):  # kto_np's fast room on as many threads as the BLAS
        fast_threads.set_threads(threads)
    _log(f"threads: {threads} ({threads_source}); BLAS: {blas}; load average {load_at_start}")
    if threads > 1 and not os.environ.get("OPENBLAS_THREAD_TIMEOUT"):
        _log("warning: OPENBLAS_THREAD_TIMEOUT is unset: OpenBLAS's threads spin ~0.1 s after each product and "
             "take the cores the fast room's threads need (benchmarks/bench_step.py sets it to 4; with "
             "`kto-np bench`, set it in the environment)")
    if busy_at_start is not None and busy_at_start > 0.25:
        _log(f"warning: other processes keep {busy_at_start:.1f} core(s) busy; timings on more than one "
             "thread suffer most (threads wait for each other's time slices)")

    xp = backend.xp()
    if args.backend == "numpy":
        numpy_gflops = measure_matmul_gflops(
            np.matmul, lambda n: tuple(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
                                       for _ in range(2)))
    else:
        def gpu_matmul(a, b):
            a @ b
            xp.cuda.Device().synchronize()

        numpy_gflops = measure_matmul_gflops(gpu_matmul, lambda n: (xp.ones((n, n), dtype=xp.float32),) * 2)
    torch_gflops = None
    if torch is not None:
        def torch_matmul(a, b):
            a @ b
            if torch_device == "cuda":
                torch.cuda.synchronize()

        torch_gflops = measure_matmul_gflops(
            torch_matmul, lambda n: (torch.randn(n, n, device=torch_device),) * 2)
    peak_gflops = max(numpy_gflops, torch_gflops or 0.0)
    _log(f"float32 matmul peak ({MATMUL_SIZE}^3): numpy {numpy_gflops:.1f} GFLOP/s"
         + ("" if torch_gflops is None else f", torch {torch_gflops:.1f} GFLOP/s"))

    results = []
    for config in configs:
        repeats = args.repeats if args.repeats is not None else DEFAULT_REPEATS[config.name]
        _log(f"[{config.name}] building both sides (C={config.hidden_size} L={config.num_layers} "
             f"NH={config.num_heads} V={config.vocab_size} T={config.seq_len} B={config.batch_size})")
        numpy_step = NumpyKTOStep(config, seed=args.seed)
        numpy_flops = scored_step_flops(config, numpy_step.batch)
        steps = {"numpy": numpy_step}
        synchronize = {"numpy": _synchronizer("numpy", args.backend)}
        if torch is not None:
            steps["torch"] = TorchKTOStep(numpy_step, device=torch_device)
            synchronize["torch"] = _synchronizer("torch", args.backend)
        jax_compile = None
        if jax is not None:
            _log(f"[{config.name}] compiling the JAX step")
            steps["jax"] = JaxKTOStep(numpy_step)
            synchronize["jax"] = lambda: None  # JaxKTOStep waits for its own results
            jax_compile = steps["jax"].compile_seconds
        profile = None
        if args.profile:
            profiled = NumpyKTOStep(config, seed=args.seed)
            profiled()  # warm-up
            profile = profile_by_op(profiled)
            _log("\n".join(format_profile(config.name, profile)))
            _profile_numpy_step(profiled)
            del profiled
        _log(f"[{config.name}] timing {args.warmup} warm-up + {repeats} step(s) per side, interleaved")
        medians = time_interleaved(steps, synchronize, repeats, args.warmup)
        del steps, numpy_step
        gc.collect()
        numpy_peak = torch_peak = jax_peak = None
        if not args.no_memory:
            _log(f"[{config.name}] peak memory: {MEMORY_STEPS} steps per side in a fresh process")
            numpy_peak = measure_memory("numpy", config, args.backend, threads)
            if torch is not None:
                torch_peak = measure_memory("torch", config, args.backend, threads)
            if jax is not None:
                jax_peak = measure_memory("jax", config, args.backend, threads)
        result = ConfigResult(config, repeats, medians["numpy"], medians.get("torch"), numpy_peak, torch_peak,
                              step_flops(config), medians.get("jax"), jax_compile, jax_peak, profile,
                              numpy_flops)
        results.append(result)
        print(format_result_line(result, peak_gflops), flush=True)

    if args.results:
        environment = ", ".join(f"{var}={os.environ[var]}" if var in os.environ else f"{var} unset"
                                for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                                            "OMP_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT", "KTO_NP_THREADS"))
        info = {
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "backend": f"kto_np ({args.backend})",
            "torch_device": ("no torch" if torch is None else f"PyTorch eager ({torch_device})")
                            + ("" if jax is None else " and JAX jit (cpu)"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "cpu": cpu_model(), "cores": os.cpu_count(), "memory": _memory_total(),
            "platform": platform.platform(), "versions": _versions(torch, jax), "blas": blas,
            "threads": threads, "threads_source": threads_source,
            "torch_threads": "n/a" if torch is None else torch.get_num_threads(),
            "fast_threads": fast_threads.threads(),
            "jax_threads": ("no JAX" if jax is None else
                            f"jax {jax.__version__}, " + ("1 thread (XLA_FLAGS)" if threads == 1 else
                                                          "XLA's own CPU thread pool")),
            "environment": environment, "numpy_gflops": numpy_gflops, "torch_gflops": torch_gflops,
            "load": f"{load_at_start} at the start, {load_average()} at the end (1, 5, 15 minutes); "
                    f"cores busy with other work: {_cores(busy_at_start)} at the start, {_cores(busy_cores())} "
                    "at the end",
            "peak_gflops": peak_gflops, "warmup": args.warmup,
        }
        write_results(args.results, format_results_markdown(results, info), args.append)
        _log(f"wrote {args.results}")

    for line in target_lines(results, peak_gflops):
        _log(f"target: {line}")
    for peer in ("torch", "jax"):
        with_peer = [r for r in results if _ratio(r, peer) is not None]
        if with_peer:
            final = next((r for r in with_peer if r.config.name == "medium"), with_peer[-1])
            print(f"ratio numpy/{peer} {final.config.name}: {_ratio(final, peer):.2f}", flush=True)
    return 0


