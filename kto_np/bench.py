"""What the benchmark times: one KTO training step in kto_np (NumPy, or CuPy), in PyTorch eager and, when
JAX is installed, in JAX (jax.jit, on the CPU; its compile time is reported on its own).

One step, the same on both sides, in this order:
  reference forward on the matched rows and on the KL rows      (no gradient)
  policy forward on the KL rows                                  (no gradient: z_ref is detached)
  policy forward on the matched rows, shifted completion log-probs, KTO loss (variant "kto")
  backward to every policy parameter, AdamW update.
The PyTorch side is kto_np.torch_reference (the independent twin the tests check kto_np against:
plain torch ops, explicit attention, no fused kernels, no torch.compile), on a copy of the same
weights. The JAX side is kto_np.jax_reference (a jax.numpy twin of the same step, one jax.jit of the
whole step, compiled ahead of time: the compile is timed apart from the steps). Dropout is 0 in every
config so that every side does the same arithmetic.

The harness that measures (threads, BLAS, matmul peak, interleaved timing, the memory probe,
RESULTS.md) is benchmarks/harness.py, outside the package: `kto-np bench` runs it from a source
checkout and says so otherwise.

    python benchmarks/bench_step.py --configs small,medium,seed --results benchmarks/RESULTS.md
    kto-np bench --tiny

Shape letters: B batch, T time, C channels, V vocabulary, NH heads, L layers.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from typing import NamedTuple

import numpy as np

from . import backend, jax_reference, torch_reference
from .architectures import build
from .fast.optim import adamw_step
from .losses import KTOConfig
from .model import GPT
from .optim import adamw_init
from .step import Batch, kto_step, make_batch, reference_logps

__all__ = [
    "CONFIGS",
    "HYPER",
    "BenchConfig",
    "JaxKTOStep",
    "NumpyKTOStep",
    "TorchKTOStep",
    "add_arguments",
    "harness_path",
    "kto_config",
    "load_harness",
    "main",
    "numpy_kto_loss_and_grads",
    "run_from_args",
    "scored_step_flops",
    "step_flops",
    "synthetic_batch",
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


# ----------------------------------------------------------------------------------------------
# the work: a synthetic batch and its floating-point operation count


def synthetic_batch(config: BenchConfig, seed: int = 0, dtype="float32") -> Batch:
    """A KTO batch of random token ids (arrays of the selected backend), built by step.make_batch, so
    its KL rows use the one rotation.

    Every row: a prompt of T // 4 tokens, a completion of T // 2 to T - T // 4 tokens, then padding
    (id 0) to T. KL row i is prompt i + completion (i - 1) mod B (TRL's rotation). Labels alternate 1, 0.
    """
    rng = np.random.default_rng(seed)
    B, T, V = config.batch_size, config.seq_len, config.vocab_size
    prompt_len = max(1, T // 4)
    prompts = [rng.integers(1, V, size=prompt_len).tolist() for _ in range(B)]
    completions = [rng.integers(1, V, size=int(rng.integers(max(1, T // 2), T - prompt_len + 1))).tolist()
                   for _ in range(B)]
    labels = (np.arange(B) % 2 == 0).astype(np.int64)
    return make_batch(prompts, completions, labels, dtype=dtype, max_len=T)


def step_flops(config: BenchConfig) -> int:
    """Floating-point operations of one step, counting matrix products only (2 per multiply-add).

    forward F = B T (2 L 12 C^2 + 2 C V) + L B NH (2 T^2 HS) * 2   (weights, head, q k^T and p v)
    backward = 2 F (an input and a weight gradient per product); step = 4 forwards + 1 backward = 6 F.
    """
    B, T, C, V, L = (config.batch_size, config.seq_len, config.hidden_size, config.vocab_size,
                     config.num_layers)
    forward = B * T * (2 * L * 12 * C * C + 2 * C * V) + L * B * 2 * (2 * T * T * C)
    return 6 * forward


def scored_step_flops(config: BenchConfig, batch: Batch) -> int:
    """The matrix products kto_np's fast step computes for this batch (2 per multiply-add): step_flops
    on each row's kept positions 0..last_b (kto_np.fast.packed; M of them) and the head at the N scored
    positions only (kto_np.fast.head). Per pass, as step_flops: M 2 L 12 C^2 + sum_b L 4 length_b^2 C
    + N 2 C V; the matched rows count 4 passes (two forwards, a backward of two), the KL rows 2."""
    C, V, L = config.hidden_size, config.vocab_size, config.num_layers

    def forward(mask) -> int:
        scored = backend.to_numpy(mask)[:, 1:] != 0  # [B, T - 1]
        lengths = [int(np.flatnonzero(row)[-1]) + 1 if row.any() else 0 for row in scored]
        return sum(length * 2 * L * 12 * C * C + L * 4 * length * length * C for length in lengths) + \
            int(scored.sum()) * 2 * C * V

    return 4 * forward(batch.completion_mask) + 2 * forward(batch.kl_completion_mask)


# ----------------------------------------------------------------------------------------------
# the kto_np side


def kto_config(hyper: dict = HYPER) -> KTOConfig:
    """The benchmark's loss: variant "kto" with HYPER's beta and weights."""
    return KTOConfig(variant="kto", beta=hyper["beta"], desirable_weight=hyper["desirable_weight"],
                     undesirable_weight=hyper["undesirable_weight"])


def numpy_kto_loss_and_grads(model: GPT, params: dict, ref_params: dict, batch: Batch, config: KTOConfig):
    """(loss, grads) of one KTO step with kto_np: exactly what training does (step.reference_logps,
    then step.kto_step: forward-only passes keep no cache, the logits buffer is reused for dlogits)."""
    ref_logps, kl_ref_logps = reference_logps(model, ref_params, batch)  # [B], [B]
    loss, _, grads = kto_step(model, params, batch, ref_logps, kl_ref_logps, config)
    return loss, grads


class NumpyKTOStep:
    """kto_np's model, reference and AdamW state on the selected backend; calling it runs one step."""

    def __init__(self, config: BenchConfig, *, seed: int = 0, dtype: str = "float32", hyper: dict = HYPER):
        self.model = build(hidden_size=config.hidden_size, num_layers=config.num_layers,
                           num_heads=config.num_heads, vocab_size=config.vocab_size, dropout=0.0,
                           max_seq_len=config.max_seq_len, dtype=dtype, fast=True)  # the fast room
        self.params = self.model.init(seed)
        self.ref_params = self.model.init(seed + 1)
        self.hyper = hyper
        self.config = kto_config(hyper)
        self.state = adamw_init(self.params)
        self.batch = synthetic_batch(config, seed, dtype)  # arrays of the selected backend

    def loss_and_grads(self):
        return numpy_kto_loss_and_grads(self.model, self.params, self.ref_params, self.batch, self.config)

    def __call__(self) -> float:
        loss, grads = self.loss_and_grads()
        hyper = self.hyper
        adamw_step(self.params, grads, self.state, lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"],
                   weight_decay=hyper["weight_decay"])
        return loss


# ----------------------------------------------------------------------------------------------
# the PyTorch side: kto_np.torch_reference on a copy of the same weights


class TorchKTOStep:
    """The PyTorch twin of NumpyKTOStep, on a copy of its weights (or sharing them, share_memory=True:
    only for measuring memory, where the NumPy side is not run)."""

    def __init__(self, numpy_step: NumpyKTOStep, *, device: str = "cpu", share_memory: bool = False,
                 hyper: dict = HYPER):
        torch = torch_reference.require_torch()

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
        logits = torch_reference.gpt2_logits(params, tokens, num_heads=self.num_heads)  # [B, T, V]
        return torch_reference.sequence_logps(logits, tokens, mask)  # [B]

    def loss(self):
        """The KTO loss with a graph to the policy parameters (same order of passes as NumpyKTOStep)."""
        with self.torch.no_grad():
            ref_logps = self._logps(self.ref_params, self.tokens, self.mask)
            kl_ref_logps = self._logps(self.ref_params, self.kl_tokens, self.kl_mask)
            kl_policy_logps = self._logps(self.params, self.kl_tokens, self.kl_mask)
        policy_logps = self._logps(self.params, self.tokens, self.mask)
        hyper = self.hyper
        return torch_reference.kto_loss(
            policy_logps, ref_logps, self.labels, hyper["beta"], hyper["desirable_weight"],
            hyper["undesirable_weight"], kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps, variant="kto")

    def __call__(self) -> float:
        loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())



# ----------------------------------------------------------------------------------------------
# the JAX side: kto_np.jax_reference, one jax.jit of the whole step, on a copy of the same weights


class JaxKTOStep:
    """The JAX twin of NumpyKTOStep (CPU), on a copy of its weights: kto_np.jax_reference.make_kto_step,
    compiled ahead of time in the constructor (compile_seconds), so that no timed call compiles."""

    def __init__(self, numpy_step: NumpyKTOStep, *, hyper: dict = HYPER):
        jax = jax_reference.require_jax()
        jnp = jax.numpy

        def array(value, dtype=None):
            return jnp.asarray(backend.to_numpy(value) if dtype is None else backend.to_numpy(value).astype(dtype))

        self.jax = jax
        self.params = {k: array(v) for k, v in numpy_step.params.items()}
        self.ref_params = {k: array(v) for k, v in numpy_step.ref_params.items()}
        self.state = jax_reference.adamw_init(self.params)
        batch = numpy_step.batch
        self.batch = {"tokens": array(batch.tokens, np.int32), "kl_tokens": array(batch.kl_tokens, np.int32),
                      "labels": array(batch.labels, np.int32), "completion_mask": array(batch.completion_mask),
                      "kl_completion_mask": array(batch.kl_completion_mask)}
        step = jax_reference.make_kto_step(num_heads=numpy_step.model.config.num_heads, hyper=hyper)
        start = time.perf_counter()
        self.step = step.lower(self.params, self.ref_params, self.state, self.batch).compile()
        self.compile_seconds = time.perf_counter() - start

    def __call__(self) -> float:
        self.params, self.state, loss = self.step(self.params, self.ref_params, self.state, self.batch)
        self.jax.block_until_ready((self.params, self.state))
        return float(loss)

# ----------------------------------------------------------------------------------------------
# the options (checked here, so that a bad option exits 2 before the harness loads)


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
    parser.add_argument("--no-torch", action="store_true", help="no PyTorch side")
    parser.add_argument("--no-jax", action="store_true", help="no JAX side (it runs when JAX is installed)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--profile", action="store_true",
                        help="also profile kto_np's step per config: where its time goes, op by op (to stderr "
                             "and into --results), and a cProfile of 3 steps (to stderr)")
    parser.add_argument("--results", default=None, metavar="PATH", help="write a RESULTS.md there (atomically)")
    parser.add_argument("--append", action="store_true", help="add a section to --results instead of replacing it")
    parser.add_argument("--seed", type=int, default=0, help="weights and batch seed (default 0)")
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
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
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


def _check_backend(name: str) -> None:
    """--backend cupy without CuPy or a GPU is an error (exit 2), found before anything runs."""
    previous = backend.get_backend()
    try:
        backend.set_backend(name)
    except (ImportError, RuntimeError) as exc:
        raise ValueError(f"--backend {name} is not available ({exc})") from exc
    finally:
        backend.set_backend(previous)


# ----------------------------------------------------------------------------------------------
# the entry point: the harness in benchmarks/ (a source checkout)


def harness_path() -> str:
    """benchmarks/harness.py next to this kto_np package (present in a source checkout only)."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(package_root, "benchmarks", "harness.py")


def load_harness():
    """The benchmarks/harness.py module (loaded once), or ImportError when kto_np is not a checkout."""
    name = "kto_np_benchmarks_harness"
    if name in sys.modules:
        return sys.modules[name]
    path = harness_path()
    if not os.path.isfile(path):
        raise ImportError(f"the benchmark harness runs from a source checkout of kto_np: {path} does not "
                          "exist (clone the repository, pip install -e '.[bench]', run kto-np bench there)")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed `args` (see add_arguments). Returns the exit code."""
    try:
        configs = _check_args(args)
        _check_backend(args.backend)
    except ValueError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    try:
        harness = load_harness()
    except ImportError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    return harness.run(args, configs)


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(
        prog="bench_step", description="One KTO training step: kto_np against PyTorch eager (speed, memory)."))
    return run_from_args(parser.parse_args(argv))
