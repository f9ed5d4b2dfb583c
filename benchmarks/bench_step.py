"""One KTO training step, kto_np against PyTorch eager: speed and peak memory.

    python benchmarks/bench_step.py --configs small,medium,seed --results benchmarks/RESULTS.md
    python benchmarks/bench_step.py --help

What is timed and the options: kto_np/bench.py (also `kto-np bench`); the measuring and the
report: benchmarks/harness.py.
"""

import os
import sys

# OpenBLAS's threads spin for about 2^28 cycles (~0.1 s) after each product before they sleep, and on a
# 2-core machine that spin takes the core the fast room's threads (kto_np.fast.threads) work on next:
# 2^4 cycles instead, set before NumPy loads OpenBLAS (an explicit setting is kept).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kto_np.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
