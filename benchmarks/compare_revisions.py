"""One KTO training step of two revisions of kto_np, in one process, the sides interleaved.

    python benchmarks/compare_revisions.py BASE_REV [--configs medium,seed] [--pairs 7] [--threads 2]
                                           [--fast-threads N]

BASE_REV (any git revision) is exported with `git archive` to a temporary folder and imported as the
package `kto_np_base` (the package imports itself relatively, so a renamed copy runs as it is); the
working tree's kto_np is the other side. Each side builds its benchmark step (kto_np.bench.NumpyKTOStep:
reference forwards, the KTO step, AdamW; float32) on the same config and seed, one warm-up call each,
then the pairs alternate which side goes first. Prints each side's median and the median of the per-pair
ratios working-tree / base (below 1: the working tree is faster), of the wall time and of the process's
CPU time (all threads; on a loaded machine the CPU time of a one-thread run, --threads 1 --fast-threads 1,
is the steadier measure of the work done, the wall time the one that counts). Where OPENBLAS_CORETYPE is set on this
machine, unset it (with OPENBLAS_L2_SIZE) for this command, as for `kto-np bench`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # as benchmarks/bench_step.py (NumPy is not loaded yet)


def _import_revision(revision: str, folder: Path):
    """kto_np as of `revision`, imported under the name kto_np_base."""
    archive = folder / "base.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "-o", str(archive), revision, "kto_np"],
                   check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    (folder / "kto_np").rename(folder / "kto_np_base")
    sys.path.insert(0, str(folder))
    return importlib.import_module("kto_np_base.bench")


def _timed(step) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process) of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - start, time.process_time() - cpu


def _set_fast_threads(package: str, count: int | None) -> str:
    """Set the fast room's thread count of `package` where it has one; says what was done."""
    try:
        threads = importlib.import_module(f"{package}.fast.threads")
    except ImportError:
        return "no thread pool"
    return f"{threads.set_threads(count)} fast-room threads"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the git revision to compare the working tree with")
    parser.add_argument("--configs", default="medium,seed")
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads (threadpoolctl), default: as is")
    parser.add_argument("--fast-threads", type=int, default=None,
                        help="threads of kto_np's fast room on each side that has one (default: its own default)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    current = importlib.import_module("kto_np.bench")
    limiter = None
    if args.threads is not None:
        from threadpoolctl import threadpool_limits
        limiter = threadpool_limits(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        base = _import_revision(args.base, Path(folder))
        print(f"base {args.base} ({_set_fast_threads('kto_np_base', args.fast_threads)}) vs working tree "
              f"({_set_fast_threads('kto_np', args.fast_threads)}), {args.pairs} pairs, BLAS threads "
              f"{args.threads or 'as is'}, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, "
              f"OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT', '(unset)')}, "
              f"load {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        for name in args.configs.split(","):
            sides = {"base": base.NumpyKTOStep(base.CONFIGS[name]),
                     "tree": current.NumpyKTOStep(current.CONFIGS[name])}
            for step in sides.values():
                step()  # warm-up
            times = {"base": [], "tree": []}
            for pair in range(args.pairs):
                order = ("base", "tree") if pair % 2 == 0 else ("tree", "base")
                for side in order:
                    times[side].append(_timed(sides[side]))
            for i, kind in enumerate(("wall", "cpu")):
                tree, base_times = [t[i] for t in times["tree"]], [t[i] for t in times["base"]]
                ratios = [t / b for t, b in zip(tree, base_times)]
                print(f"{name:7s} {kind:4s} base {1e3 * statistics.median(base_times):8.1f} ms   tree "
                      f"{1e3 * statistics.median(tree):8.1f} ms   tree/base {statistics.median(ratios):.3f} "
                      f"(per-pair ratios {min(ratios):.3f}..{max(ratios):.3f})", flush=True)
            del sides
    if limiter is not None:
        limiter.restore_original_limits()
    return 0


if __name__ == "__main__":
    sys.exit(main())
