"""One KTO training step, kto_np against PyTorch eager: speed and peak memory.

    python benchmarks/bench_step.py --configs small,medium,seed --results benchmarks/RESULTS.md
    python benchmarks/bench_step.py --help

What is timed and the options: kto_np/bench.py (also `kto-np bench`); the measuring and the
report: benchmarks/harness.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kto_np.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
