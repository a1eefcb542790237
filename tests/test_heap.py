"""Freed heap memory goes back to the OS: what keeps a long-lived purify actor at one batch's working set."""

import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.heap import _malloc_trim

# Frees 200 MB of small numpy buffers while the last one pins the top of the heap, so glibc keeps every freed page
# until it is asked to release them.
SCRIPT = """
import numpy as np, psutil
from pipeline.heap import release_freed_memory
p = psutil.Process()
arrays = [np.ones(2048, np.uint8) for _ in range(100_000)]
pin = arrays[-1]
del arrays
held = p.memory_info().rss
released = release_freed_memory()
print(held, p.memory_info().rss, released)
"""


@pytest.mark.skipif(_malloc_trim() is None, reason="needs glibc's malloc_trim")
def test_release_freed_memory_returns_pages_held_below_the_top_of_the_heap():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout.split()
    held, after, released = int(out[0]), int(out[1]), out[2]
    assert released == "True"
    assert held - after > 100 * 2**20, (held, after)  # most of the 200 MB came back


def test_releasing_keeps_the_function_its_name_and_its_errors():
    from pipeline.decode import decode_batch
    from pipeline.heap import releasing

    wrapped = releasing(decode_batch)
    assert wrapped.__name__ == "decode_batch"  # Ray Data names the stage after it
    out = wrapped({"image_bytes": np.array([b"not an image"], dtype=object)}, size=28, channels=1)
    assert out["image"].shape == (1, 1, 28, 28) and "not an image" in out["error"][0]
    with pytest.raises(ValueError, match="unknown size policy"):
        wrapped({"image_bytes": np.array([b""], dtype=object)}, size=28, channels=1, policy="stretch")


# The job's own Ray cluster, as `python -m pipeline sanitize` starts it: what allocator do its workers give Arrow?
WORKER_POOL = """
import pyarrow as pa, ray
from pipeline.config import load_config
from pipeline.job import init_ray
init_ray(load_config())
print(ray.get(ray.remote(num_cpus=0)(lambda: pa.default_memory_pool().backend_name).remote()))
ray.shutdown()
"""


@pytest.mark.parametrize("user_choice", [None, "mimalloc"])
def test_the_jobs_ray_workers_give_arrow_the_system_allocator_unless_the_user_chose(user_choice):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ARROW_DEFAULT_MEMORY_POOL")}
    if user_choice:
        env["ARROW_DEFAULT_MEMORY_POOL"] = user_choice
    out = subprocess.run([sys.executable, "-c", WORKER_POOL], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == (user_choice or "system")
