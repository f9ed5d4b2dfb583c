"""The fast room's thread pool: elementwise and row-wise work spread over the cores.

NumPy's ufuncs and reductions release the GIL, so a few Python threads, each running the same NumPy
calls on its own rows, use every core where one NumPy call uses one. The fast ops cut their arrays
into **fixed blocks** (`blocks`: a number of rows that depends on the array's shape only, never on the
number of threads) and hand the blocks to `run`, where each thread takes the next block left (a thread
that the system deschedules takes fewer, and the others do not wait for it).
Each block is computed by the same calls whatever thread runs it, and anything summed over blocks is
added in block order afterwards, so **the numbers do not depend on the thread count** (tests/test_fast.py
runs every op on 1, 2 and 3 threads and compares bit for bit).

The thread count: `KTO_NP_THREADS` when set (1 = no threads), else NumPy's BLAS thread count
(threadpoolctl when installed; OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS; else the cores
this process may run on). `set_threads(n)` changes it for the process; `set_threads(None)` goes back
to the default.

CuPy arrays never come here: the fast ops run them whole, on the device (`numpy_only`).

OpenBLAS's own threads spin for about 2^28 cycles (~0.1 s) after each matrix product before they
sleep; on a machine with as many cores as threads the spinning thread takes the core a worker of this
pool needs, and the threads win nothing. Set OPENBLAS_THREAD_TIMEOUT=4 in the environment (read when
NumPy loads OpenBLAS): benchmarks/bench_step.py does.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["BLOCK_ELEMENTS", "ENV_VAR", "batched_matmul", "blocked", "blocks", "default_threads", "numpy_only", "run",
           "scratch", "set_threads", "threads"]

ENV_VAR = "KTO_NP_THREADS"

# Entries per block (256 KiB of float32): a block and the two or three block-sized scratch buffers an
# op uses stay in a core's L2 cache while the op's passes go over it, and a thread's share of a
# [B, T, 4C] array is still many blocks.
BLOCK_ELEMENTS = 1 << 16

# Below this many entries of work a job runs in the calling thread: waking a worker costs tens of
# microseconds on a quiet machine and milliseconds on a busy one, more than a small op takes.
MIN_PARALLEL_ELEMENTS = 1 << 19

_state: dict = {"threads": None, "executor": None, "executor_threads": 0, "blas": None}
_lock = threading.Lock()
_local = threading.local()  # per thread: the scratch buffers, and whether this thread is a worker


def _blas_threads() -> int | None:
    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415  (optional: a better guess when there)
    except ImportError:
        threadpool_info = None
    if threadpool_info is not None:
        pools = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        numpy_pools = [i for i in pools if "numpy" in i.get("filepath", "")] or pools
        if numpy_pools:
            return int(numpy_pools[0]["num_threads"])
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def default_threads() -> int:
    """KTO_NP_THREADS, else the BLAS thread count, else the cores this process may use (>= 1)."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{ENV_VAR} must be a positive integer (1 = no threads), got {value!r}")
        return int(value)
    blas = _blas_threads()
    if blas is not None:
        return max(1, blas)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads() -> int:
    """The number of threads the fast ops use now."""
    if _state["threads"] is None:
        _state["threads"] = default_threads()
    return _state["threads"]


def set_threads(count: int | None) -> int:
    """Use `count` threads from now on (1 = none; None = the default again). Returns the count."""
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"count must be a positive integer or None, got {count!r}")
    _state["threads"] = default_threads() if count is None else count
    return _state["threads"]


def _executor(workers: int) -> ThreadPoolExecutor:
    with _lock:
        if _state["executor"] is None or _state["executor_threads"] < workers:
            if _state["executor"] is not None:
                _state["executor"].shutdown(wait=True)
            _state["executor"] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kto_np-fast")
            _state["executor_threads"] = workers
        return _state["executor"]


def numpy_only(*arrays) -> bool:
    """True when every array is a NumPy array (CuPy arrays are run whole, never in threads)."""
    return all(isinstance(a, np.ndarray) for a in arrays)


def blocked(*arrays) -> bool:
    """Whether an op on these arrays goes in blocks: NumPy arrays, the first more than one block and at
    least MIN_PARALLEL_ELEMENTS entries. A smaller array is one op on the whole array (it fits in the
    cache, and the blocks' bookkeeping would cost more than they save). A choice by size only: the
    numbers still do not depend on the thread count."""
    return numpy_only(*arrays) and arrays[0].size > BLOCK_ELEMENTS and arrays[0].size >= MIN_PARALLEL_ELEMENTS


def blocks(rows: int, row_size: int, block_elements: int | None = None) -> list[tuple[int, int]]:
    """[(start, stop), ...] cutting range(rows) into blocks of about BLOCK_ELEMENTS entries (rows of
    row_size entries each, at least one row a block). Depends on the shape only."""
    per_block = max(1, (block_elements or BLOCK_ELEMENTS) // max(1, row_size))
    return [(start, min(start + per_block, rows)) for start in range(0, rows, per_block)]


def scratch(size: int, dtype) -> np.ndarray:
    """A 1-D buffer of at least `size` entries of `dtype`, this thread's own, reused from call to call
    (its contents are whatever the last user left)."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = np.dtype(dtype)
    buffer = buffers.get(key)
    if buffer is None or buffer.size < size:
        buffer = buffers[key] = np.empty(max(size, BLOCK_ELEMENTS), dtype=key)
    return buffer[:size]


class _Job:
    """Tasks handed out one at a time to whichever thread asks next (a slow or descheduled thread takes
    fewer; which thread runs a task never changes what the task computes)."""

    def __init__(self, function, tasks, errors: dict):
        self.function, self.tasks, self.errors = function, tasks, errors
        self.next = itertools.count()  # next() is atomic under the GIL
        self.lock = threading.Lock()
        self.done = 0
        self.finished = threading.Event()
        self.error: BaseException | None = None

    def work(self) -> None:
        """Run tasks until none is left (in a worker, or in the calling thread)."""
        was_worker = getattr(_local, "worker", False)
        _local.worker = True
        try:
            with np.errstate(**self.errors):  # the caller's error state (NumPy keeps it per thread)
                while True:
                    index = next(self.next)
                    if index >= len(self.tasks):
                        return
                    try:
                        if self.error is None:
                            self.function(*self.tasks[index])
                    except BaseException as exc:  # noqa: BLE001  (handed to the caller, raised there)
                        with self.lock:
                            self.error = self.error or exc
                    finally:
                        with self.lock:
                            self.done += 1
                            if self.done == len(self.tasks):
                                self.finished.set()
        finally:
            _local.worker = was_worker


def run(function, tasks, work: int | None = None) -> None:
    """function(*task) for every task, spread over threads() threads (the calling thread one of them):
    each thread takes the next task left until none is. Returns when all are done; raises the first
    error. Serial (in order, in this thread) with one thread, one task, less `work` (entries, when
    given) than MIN_PARALLEL_ELEMENTS, or when called from a worker."""
    tasks = list(tasks)
    count = min(threads(), len(tasks))
    if count <= 1 or (work is not None and work < MIN_PARALLEL_ELEMENTS) or getattr(_local, "worker", False):
        for task in tasks:
            function(*task)
        return
    job = _Job(function, tasks, np.geterr())
    executor = _executor(count - 1)
    for _ in range(count - 1):
        executor.submit(job.work)
    job.work()
    job.finished.wait()  # the tasks that workers took are done (a worker that starts late finds none)
    if job.error is not None:
        raise job.error


def _blas_controller():
    """threadpoolctl's controller of the BLAS libraries, or False when threadpoolctl is not installed."""
    if _state["blas"] is None:
        try:
            from threadpoolctl import ThreadpoolController  # noqa: PLC0415  (optional)
        except ImportError:
            _state["blas"] = False
        else:
            _state["blas"] = ThreadpoolController().select(user_api="blas")
    return _state["blas"]


def batched_matmul(a, b):
    """a @ b for stacks of small matrices, a [..., m, k] and b [..., k, n] with the same leading shape.

    With more than one thread and threadpoolctl installed: blocks of the stack over this pool, each
    product on one BLAS thread. A threaded BLAS splits each small product over its threads and makes
    them meet once per product (attention: B NH products of [T, HS] @ [HS, T] a layer); the pool hands
    whole products to the threads instead, and a thread that the system deschedules holds nobody up.
    (The BLAS runs on one thread while the products do: the whole process's BLAS, for that time.)
    Otherwise, and for CuPy arrays: a @ b.
    """
    controller = _blas_controller() if threads() > 1 and numpy_only(a, b) and a.ndim >= 3 else False
    if not controller or a.shape[:-2] != b.shape[:-2]:
        return a @ b
    m, n = a.shape[-2], b.shape[-1]
    out = np.empty((*a.shape[:-2], m, n), dtype=np.result_type(a, b))
    a_stack, b_stack = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    out_stack = out.reshape(-1, m, n)
    tasks = blocks(out_stack.shape[0], m * n)
    work = out.size * a.shape[-1]  # multiply-adds
    if len(tasks) < 2 or work < MIN_PARALLEL_ELEMENTS * 16:
        return a @ b
    with controller.limit(limits=1):
        run(lambda start, stop: np.matmul(a_stack[start:stop], b_stack[start:stop], out=out_stack[start:stop]), tasks)
    return out
