"""Speed and memory of one KTO training step: kto_np (NumPy, or CuPy) against PyTorch eager.

One step, the same on both sides, in this order:
  reference forward on the matched rows and on the KL rows      (no gradient)
  policy forward on the KL rows                                  (no gradient: z_ref is detached)
  policy forward on the matched rows, shifted completion log-probs, KTO loss (variant "kto")
  backward to every policy parameter, AdamW update.
The PyTorch side is an independent implementation of the same GPT-2 model written here with plain
torch ops (explicit attention, no fused kernels, no torch.compile), on a copy of the same weights,
run on the same number of threads, timed in the same process with the two sides interleaved.
Dropout is 0 in every config so that both sides do exactly the same arithmetic.

    python benchmarks/bench_step.py --configs small,medium,seed --results benchmarks/RESULTS.md
    kto-np bench --tiny

Shape letters: B batch, T time, C channels, V vocabulary, NH heads, L layers.
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

from . import __version__, backend
from .cli import nonnegative_int
from .data import Batch
from .files import atomic_write
from .model import GPT, build
from .optim import adamw_init, adamw_step
from .train import kto_loss_and_param_grads, reference_logps

__all__ = [
    "CONFIGS",
    "HYPER",
    "BenchConfig",
    "NumpyKTOStep",
    "TorchKTOStep",
    "add_arguments",
    "blas_threads",
    "main",
    "numpy_kto_loss_and_grads",
    "run_from_args",
    "step_flops",
    "synthetic_batch",
    "torch_gpt_logits",
    "torch_kto_loss",
    "torch_sequence_logps",
]


class BenchConfig(NamedTuple):
    name: str
    hidden_size: int  # C
    num_layers: int  # L
    num_heads: int  # NH
    vocab_size: int  # V
    seq_len: int  # T
    batch_size: int  # B
    max_seq_len: int  # rows of wpe.weight (updated by AdamW like every parameter)


CONFIGS = {
    "tiny": BenchConfig("tiny", 32, 1, 2, 64, 16, 2, 16),
    "small": BenchConfig("small", 128, 2, 4, 512, 64, 8, 64),
    "medium": BenchConfig("medium", 256, 4, 8, 8192, 128, 8, 128),
    "seed": BenchConfig("seed", 512, 6, 8, 32000, 256, 4, 2048),  # the seed's build() defaults
}

# Loss and optimizer hyper-parameters, the same on both sides.
HYPER = {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0,
         "lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}

DEFAULT_REPEATS = {"tiny": 5, "small": 20, "medium": 10, "seed": 5}
MEMORY_STEPS = 3
MATMUL_SIZE = 2048


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# the work: a synthetic batch and its floating-point operation count


def synthetic_batch(config: BenchConfig, seed: int = 0, dtype="float32") -> Batch:
    """A KTO batch of random token ids (NumPy arrays), shaped like data.collate's.

    Every row: a prompt of T // 4 tokens, a completion of T // 2 to T - T // 4 tokens, then padding
    (id 0). KL row i is prompt i + completion (i - 1) mod B (TRL's rotation). Labels alternate 1, 0.
    """
    rng = np.random.default_rng(seed)
    B, T, V = config.batch_size, config.seq_len, config.vocab_size
    prompt_len = max(1, T // 4)
    prompts = [rng.integers(1, V, size=prompt_len) for _ in range(B)]
    completions = [rng.integers(1, V, size=int(rng.integers(max(1, T // 2), T - prompt_len + 1)))
                   for _ in range(B)]

    def rows(completion_of_row):
        tokens = np.zeros((B, T), dtype=np.int64)
        mask = np.zeros((B, T), dtype=dtype)
        for b in range(B):
            completion = completion_of_row[b]
            tokens[b, :prompt_len] = prompts[b]
            tokens[b, prompt_len:prompt_len + len(completion)] = completion
            mask[b, prompt_len:prompt_len + len(completion)] = 1
        return tokens, mask

    tokens, mask = rows(completions)
    kl_tokens, kl_mask = rows(completions[-1:] + completions[:-1])
    labels = np.arange(B, dtype=np.int64) % 2 == 0
    return Batch(tokens=tokens, completion_mask=mask, labels=labels.astype(np.int64), kl_tokens=kl_tokens,
                 kl_completion_mask=kl_mask, prompts=("",) * B, completions=("",) * B,
                 kl_completions=("",) * B)


def step_flops(config: BenchConfig) -> int:
    """Floating-point operations of one step, counting matrix products only (2 per multiply-add).

    forward F = B T (2 L 12 C^2 + 2 C V) + L B NH (2 T^2 HS) * 2   (weights, head, q k^T and p v)
    backward = 2 F (an input and a weight gradient per product); step = 4 forwards + 1 backward = 6 F.
    """
    B, T, C, V, L = (config.batch_size, config.seq_len, config.hidden_size, config.vocab_size,
                     config.num_layers)
    forward = B * T * (2 * L * 12 * C * C + 2 * C * V) + L * B * 2 * (2 * T * T * C)
    return 6 * forward


# ----------------------------------------------------------------------------------------------
# the kto_np side


def numpy_kto_loss_and_grads(model: GPT, params: dict, ref_params: dict, batch: Batch, hyper: dict = HYPER):
    """(loss, grads) of one KTO step with kto_np: exactly what training does (train.reference_logps,
    then train.kto_loss_and_param_grads: forward-only passes keep no cache, the logits buffer is
    reused for dlogits)."""
    ref_logps, kl_ref_logps = reference_logps(model, ref_params, batch)  # [B], [B]
    loss, _, grads = kto_loss_and_param_grads(
        model, params, batch, ref_logps, kl_ref_logps, variant="kto", beta=hyper["beta"],
        desirable_weight=hyper["desirable_weight"], undesirable_weight=hyper["undesirable_weight"])
    return loss, grads


class NumpyKTOStep:
    """kto_np's model, reference and AdamW state on the selected backend; calling it runs one step."""

    def __init__(self, config: BenchConfig, *, seed: int = 0, dtype: str = "float32", hyper: dict = HYPER):
        self.model = build(hidden_size=config.hidden_size, num_layers=config.num_layers,
                           num_heads=config.num_heads, vocab_size=config.vocab_size, dropout=0.0,
                           max_seq_len=config.max_seq_len, dtype=dtype)
        self.params = self.model.init(seed)
        self.ref_params = self.model.init(seed + 1)
        self.hyper = hyper
        self.state = adamw_init(self.params)
        host_batch = synthetic_batch(config, seed, dtype)
        self.batch = host_batch._replace(**{name: backend.asarray(getattr(host_batch, name)) for name in (
            "tokens", "completion_mask", "labels", "kl_tokens", "kl_completion_mask")})

    def loss_and_grads(self):
        return numpy_kto_loss_and_grads(self.model, self.params, self.ref_params, self.batch, self.hyper)

    def __call__(self) -> float:
        loss, grads = self.loss_and_grads()
        hyper = self.hyper
        adamw_step(self.params, grads, self.state, lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"],
                   weight_decay=hyper["weight_decay"])
        return loss


# ----------------------------------------------------------------------------------------------
# the PyTorch side: the same model, written independently with plain torch ops


def torch_gpt_logits(params: dict, tokens, num_heads: int):
    """GPT-2 forward in torch (tied head, learned positions). params: kto_np names -> tensors.

    tokens [B, T] int64 -> logits [B, T, V].
    """
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    B, T = tokens.shape
    V, C = params["wte.weight"].shape
    HS = C // num_heads
    num_layers = sum(1 for name in params if name.endswith(".ln_1.weight"))
    causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
    x = params["wte.weight"][tokens] + params["wpe.weight"][:T]  # [B, T, C]
    for layer in range(num_layers):
        p = f"h.{layer}."
        h = F.layer_norm(x, (C,), params[p + "ln_1.weight"], params[p + "ln_1.bias"], 1e-5)
        qkv = h @ params[p + "attn.c_attn.weight"] + params[p + "attn.c_attn.bias"]  # [B, T, 3C]
        q, k, v = (part.view(B, T, num_heads, HS).transpose(1, 2) for part in qkv.split(C, dim=-1))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(HS))  # [B, NH, T, T]
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        y = (probs @ v).transpose(1, 2).reshape(B, T, C)
        x = x + y @ params[p + "attn.c_proj.weight"] + params[p + "attn.c_proj.bias"]
        h = F.layer_norm(x, (C,), params[p + "ln_2.weight"], params[p + "ln_2.bias"], 1e-5)
        h = F.gelu(h @ params[p + "mlp.c_fc.weight"] + params[p + "mlp.c_fc.bias"], approximate="tanh")
        x = x + h @ params[p + "mlp.c_proj.weight"] + params[p + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (C,), params["ln_f.weight"], params["ln_f.bias"], 1e-5)
    return x @ params["wte.weight"].T


def torch_sequence_logps(logits, tokens, completion_mask):
    """sum_{t>=1} mask[b, t] log_softmax(logits[b, t-1])[tokens[b, t]]: [B, T, V] -> [B]."""
    import torch  # noqa: PLC0415

    token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
    return (token_logps * completion_mask[:, 1:]).sum(dim=1)


def torch_kto_loss(policy_logps, ref_logps, kl_policy_logps, kl_ref_logps, labels, beta=0.1,
                   desirable_weight=1.0, undesirable_weight=1.0):
    """TRL's KTO loss: z = max(0, mean(kl_policy - kl_ref)) detached, r = policy - ref,
    desirable λ_D (1 - σ(β (r - z))), undesirable λ_U (1 - σ(β (z - r))), mean over the batch."""
    import torch  # noqa: PLC0415

    z = (kl_policy_logps - kl_ref_logps).mean().clamp(min=0).detach()
    log_ratios = policy_logps - ref_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (log_ratios - z)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z - log_ratios)))
    return torch.where(labels.bool(), desirable, undesirable).mean()


class TorchKTOStep:
    """The PyTorch twin of NumpyKTOStep, on a copy of its weights (or sharing them, share_memory=True:
    only for measuring memory, where the NumPy side is not run)."""

    def __init__(self, numpy_step: NumpyKTOStep, *, device: str = "cpu", share_memory: bool = False,
                 hyper: dict = HYPER):
        import torch  # noqa: PLC0415

        def tensor(array):
            host = backend.to_numpy(array)
            if share_memory and device == "cpu":
                return torch.from_numpy(host)
            return torch.tensor(host, device=device)

        self.torch = torch
        self.num_heads = numpy_step.model.config.num_heads
        self.params = {k: tensor(v).requires_grad_() for k, v in numpy_step.params.items()}
        self.ref_params = {k: tensor(v) for k, v in numpy_step.ref_params.items()}
        batch = numpy_step.batch
        self.tokens, self.kl_tokens, self.labels = (tensor(batch.tokens), tensor(batch.kl_tokens),
                                                    tensor(batch.labels))
        self.mask, self.kl_mask = tensor(batch.completion_mask), tensor(batch.kl_completion_mask)
        self.hyper = hyper
        decayed = [p for p in self.params.values() if p.ndim >= 2]  # as kto_np.optim's default decay_mask
        not_decayed = [p for p in self.params.values() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decayed, "weight_decay": hyper["weight_decay"]}, {"params": not_decayed, "weight_decay": 0.0}],
            lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"])

    def _logps(self, params, tokens, mask):
        return torch_sequence_logps(torch_gpt_logits(params, tokens, self.num_heads), tokens, mask)

    def loss(self):
        """The KTO loss with a graph to the policy parameters (same order of passes as NumpyKTOStep)."""
        with self.torch.no_grad():
            ref_logps = self._logps(self.ref_params, self.tokens, self.mask)
            kl_ref_logps = self._logps(self.ref_params, self.kl_tokens, self.kl_mask)
            kl_policy_logps = self._logps(self.params, self.kl_tokens, self.kl_mask)
        policy_logps = self._logps(self.params, self.tokens, self.mask)
        hyper = self.hyper
        return torch_kto_loss(policy_logps, ref_logps, kl_policy_logps, kl_ref_logps, self.labels,
                              hyper["beta"], hyper["desirable_weight"], hyper["undesirable_weight"])

    def __call__(self) -> float:
        loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


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

    argv: side ("numpy" | "torch"), config JSON, steps, backend ("numpy" | "cupy"), threads.
    CPU: the peak RSS (VmHWM, reset first) during the steps minus the RSS before the model is built:
    parameters, reference, AdamW state, activations, gradients and what the allocator keeps. Both
    sides first run one tiny step and a 512^3 product, so that neither counts its libraries'
    one-time set-up (thread pools, BLAS buffers). GPU: CuPy's pool size, torch.cuda.max_memory_allocated.
    """
    side, config_json, steps, backend_name, threads = argv
    config, steps, threads = BenchConfig(**json.loads(config_json)), int(steps), int(threads)
    backend.set_backend(backend_name)
    if blas_threads()[0] != threads:
        limit_blas_threads(threads)  # kept for the life of this process
    device = "cuda" if backend_name == "cupy" else "cpu"

    def make_step(step_config):
        numpy_step = NumpyKTOStep(step_config)
        if side == "numpy":
            return numpy_step
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
        print(json.dumps({"peak_bytes": _peak_rss_bytes() - before, "measure": "rss"}))
    return 0


def measure_memory(side: str, config: BenchConfig, backend_name: str, threads: int,
                   steps: int = MEMORY_STEPS) -> int | None:
    """Peak memory in bytes of `side` alone in a subprocess (memory_probe_main), or None on failure."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # a fresh process: the BLAS thread count can be set before NumPy loads (no threadpoolctl needed)
    env.update({var: str(threads) for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    code = "import sys; from kto_np.bench import memory_probe_main; sys.exit(memory_probe_main(sys.argv[1:]))"
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
    flops: int


def _cores(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2f}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


def _ratio(result: ConfigResult) -> float | None:
    return None if result.torch_seconds is None else result.numpy_seconds / result.torch_seconds


def format_result_line(result: ConfigResult, peak_gflops: float) -> str:
    config = result.config
    numpy_gflops = result.flops / result.numpy_seconds / 1e9
    parts = [f"{config.name}: numpy {result.numpy_seconds * 1e3:.1f} ms"]
    if result.torch_seconds is not None:
        parts[0] += f", torch {result.torch_seconds * 1e3:.1f} ms, ratio {_ratio(result):.2f}"
    parts.append(f"peak memory numpy {_mib(result.numpy_peak_bytes)}"
                 + ("" if result.torch_seconds is None else f", torch {_mib(result.torch_peak_bytes)}"))
    flops_part = f"numpy {numpy_gflops:.1f} GFLOP/s ({numpy_gflops / peak_gflops:.0%} of peak)"
    if result.torch_seconds is not None:
        torch_gflops = result.flops / result.torch_seconds / 1e9
        flops_part += f", torch {torch_gflops:.1f} GFLOP/s ({torch_gflops / peak_gflops:.0%})"
    parts.append(flops_part)
    return " | ".join(parts)


def _versions(torch_module) -> str:
    parts = [f"Python {platform.python_version()}", f"NumPy {np.__version__}", f"kto_np {__version__}"]
    if torch_module is not None:
        parts.append(f"torch {torch_module.__version__}")
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
        f"- threads: {info['threads']} for both sides ({info['threads_source']}); "
        f"torch.get_num_threads() = {info['torch_threads']}",
        f"- environment: {info['environment']}",
        f"- load average: {info['load']}",
        f"- float32 matmul peak ({MATMUL_SIZE}^3 sgemm, best of 3): NumPy {info['numpy_gflops']:.1f} GFLOP/s"
        + ("" if info["torch_gflops"] is None else f", torch {info['torch_gflops']:.1f} GFLOP/s")
        + f"; peak used below: {info['peak_gflops']:.1f} GFLOP/s",
        f"- repeats: median of the timed steps after {info['warmup']} warm-up step(s) per side, "
        "the two sides interleaved; memory: peak RSS rise of "
        f"{MEMORY_STEPS} steps of one side alone in a fresh process",
        "",
        "| config | C | L | NH | V | T | B | repeats | numpy ms | torch ms | numpy/torch | numpy peak | "
        "torch peak | numpy GFLOP/s | torch GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.config
        numpy_gflops = r.flops / r.numpy_seconds / 1e9
        peak = info["peak_gflops"]
        torch_ms = "n/a" if r.torch_seconds is None else f"{r.torch_seconds * 1e3:.1f}"
        ratio = "n/a" if r.torch_seconds is None else f"{_ratio(r):.2f}"
        torch_gflops = ("n/a" if r.torch_seconds is None
                        else f"{r.flops / r.torch_seconds / 1e9:.1f} ({r.flops / r.torch_seconds / 1e9 / peak:.0%})")
        lines.append(
            f"| {c.name} | {c.hidden_size} | {c.num_layers} | {c.num_heads} | {c.vocab_size} | {c.seq_len} | "
            f"{c.batch_size} | {r.repeats} | {r.numpy_seconds * 1e3:.1f} | {torch_ms} | {ratio} | "
            f"{_mib(r.numpy_peak_bytes)} | {_mib(r.torch_peak_bytes)} | "
            f"{numpy_gflops:.1f} ({numpy_gflops / peak:.0%}) | {torch_gflops} |")
    lines += [
        "",
        "One step: reference forward (matched and KL rows) and policy forward on the KL rows without "
        "gradient, policy forward + backward on the matched rows, KTO loss (variant kto), AdamW "
        "(lr 1e-4, wd 0.01 on matrices). float32, dropout 0 on both sides. GFLOP/s counts matrix "
        "products only (6 forward-equivalents per step); the percentage is of the matmul peak above.",
        "",
    ]
    return "\n".join(lines)


RESULTS_HEADER = """# Benchmarks: one KTO step, kto_np against PyTorch eager

Generated by `python benchmarks/bench_step.py --results benchmarks/RESULTS.md` (kto_np/bench.py);
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


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options (for `kto-np bench` and benchmarks/bench_step.py)."""
    parser.add_argument("--configs", default="small,medium,seed",
                        help=f"comma-separated configs from {', '.join(CONFIGS)} (default: small,medium,seed)")
    parser.add_argument("--tiny", action="store_true", help="only the tiny config (a few seconds; for tests)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per side (default per config: "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_REPEATS.items()) + ")")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side first (default 1)")
    parser.add_argument("--backend", choices=backend.BACKENDS, default="numpy",
                        help="kto_np's array module; cupy compares with torch on CUDA (default numpy)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both sides (default: NumPy's BLAS threads; another number needs "
                             "threadpoolctl)")
    parser.add_argument("--no-torch", action="store_true", help="time kto_np only")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--profile", action="store_true",
                        help="also print a cProfile of 3 kto_np steps per config (to stderr)")
    parser.add_argument("--results", default=None, metavar="PATH", help="write a RESULTS.md there (atomically)")
    parser.add_argument("--append", action="store_true", help="add a section to --results instead of replacing it")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="weights and batch seed (default 0)")
    return parser


def _check_args(args) -> list[BenchConfig]:
    names = ["tiny"] if args.tiny else [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        raise ValueError(f"--configs must be a comma-separated list from {tuple(CONFIGS)}, got {args.configs!r}")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.append and not args.results:
        raise ValueError("--append needs --results PATH")
    if args.results is not None:
        _check_results_path(args.results)
    return [CONFIGS[n] for n in names]


def _check_results_path(path: str) -> None:
    """--results is checked before the benchmark runs (minutes), not when writing its table."""
    if not path:
        raise ValueError("--results must be a file name, got an empty string")
    if os.path.isdir(path):
        raise ValueError(f"--results must be a file name, got the folder {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--results {path!r}: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"--results {path!r} is not writable")


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


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed `args` (see add_arguments). Returns the exit code."""
    try:
        configs = _check_args(args)
    except ValueError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    try:
        backend.set_backend(args.backend)
    except (ImportError, RuntimeError) as exc:
        print(f"bench: error: --backend {args.backend} is not available ({exc})", file=sys.stderr)
        return 2
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
        _log(f"timing kto_np only: {no_torch_reason}")
    else:
        torch.set_num_threads(threads)
    _log(f"threads: {threads} ({threads_source}); BLAS: {blas}; load average {load_at_start}")
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
        steps = {"numpy": numpy_step}
        synchronize = {"numpy": _synchronizer("numpy", args.backend)}
        if torch is not None:
            steps["torch"] = TorchKTOStep(numpy_step, device=torch_device)
            synchronize["torch"] = _synchronizer("torch", args.backend)
        if args.profile:
            _profile_numpy_step(NumpyKTOStep(config, seed=args.seed))
        _log(f"[{config.name}] timing {args.warmup} warm-up + {repeats} step(s) per side, interleaved")
        medians = time_interleaved(steps, synchronize, repeats, args.warmup)
        del steps, numpy_step
        gc.collect()
        numpy_peak = torch_peak = None
        if not args.no_memory:
            _log(f"[{config.name}] peak memory: {MEMORY_STEPS} steps per side in a fresh process")
            numpy_peak = measure_memory("numpy", config, args.backend, threads)
            if torch is not None:
                torch_peak = measure_memory("torch", config, args.backend, threads)
        result = ConfigResult(config, repeats, medians["numpy"], medians.get("torch"), numpy_peak, torch_peak,
                              step_flops(config))
        results.append(result)
        print(format_result_line(result, peak_gflops), flush=True)

    if args.results:
        environment = ", ".join(f"{var}={os.environ[var]}" if var in os.environ else f"{var} unset"
                                for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                                            "OMP_NUM_THREADS"))
        info = {
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "backend": f"kto_np ({args.backend})",
            "torch_device": "no torch" if torch is None else f"PyTorch eager ({torch_device})",
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "cpu": cpu_model(), "cores": os.cpu_count(), "memory": _memory_total(),
            "platform": platform.platform(), "versions": _versions(torch), "blas": blas,
            "threads": threads, "threads_source": threads_source,
            "torch_threads": "n/a" if torch is None else torch.get_num_threads(),
            "environment": environment, "numpy_gflops": numpy_gflops, "torch_gflops": torch_gflops,
            "load": f"{load_at_start} at the start, {load_average()} at the end (1, 5, 15 minutes); "
                    f"cores busy with other work: {_cores(busy_at_start)} at the start, {_cores(busy_cores())} "
                    "at the end",
            "peak_gflops": peak_gflops, "warmup": args.warmup,
        }
        write_results(args.results, format_results_markdown(results, info), args.append)
        _log(f"wrote {args.results}")

    with_torch = [r for r in results if r.torch_seconds is not None]
    if with_torch:
        final = next((r for r in with_torch if r.config.name == "medium"), with_torch[-1])
        print(f"ratio numpy/torch {final.config.name}: {_ratio(final):.2f}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(
        prog="bench_step", description="One KTO training step: kto_np against PyTorch eager (speed, memory)."))
    return run_from_args(parser.parse_args(argv))
