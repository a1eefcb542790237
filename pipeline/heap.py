"""Give freed heap memory back to the operating system between batches.

glibc's malloc keeps the pages of freed chunks in its arenas and returns them only from the top of each heap. A
long-lived purify actor allocates model activations and per-batch arrays of ever-changing shapes (each round
purifies a different subset of rows), so its arenas fragment and its resident memory creeps up with the number of
batches instead of staying at one batch's working set. Ray's task workers, reused for every read, decode and write
of the job, run the same release. `malloc_trim(0)` releases every free page, wherever it sits; Arrow's pool is asked
to do the same. Neither costs anything measurable next to a batch (docs/benchmarks.md).

Arrow's bundled allocator (mimalloc in pyarrow's wheels) keeps pages in per-thread heaps, and the pages that
Parquet reads allocate on Arrow's own I/O and CPU threads are out of reach of a release from the task's thread: a
task worker stays at the high-water mark of the reads it ran at once. So the job's Ray workers use the system
allocator for Arrow (`worker_env`), whose pages `malloc_trim` does reach.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

WORKER_ENV: dict[str, str] = {"ARROW_DEFAULT_MEMORY_POOL": "system"}


def worker_env() -> dict[str, str]:
    """Environment variables for the job's Ray workers: `WORKER_ENV` less what this process already sets. A user's
    own choice wins, and Ray refuses a runtime env that sets a variable the submitted job's env also sets."""
    return {k: v for k, v in WORKER_ENV.items() if k not in os.environ}


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only; musl and other C libraries do not have it
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return free heap pages to the OS; False where the C library cannot (not glibc) or had nothing to release."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def releasing(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn`, then `release_freed_memory()`: for the batch functions a long-lived worker runs again and again."""

    @functools.wraps(fn)  # Ray Data names the stage after the function
    def run(*args, **kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        finally:
            release_freed_memory()

    return run
