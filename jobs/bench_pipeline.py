"""Pipeline overhead and memory: end-to-end img/s of `sanitize` vs the bare purifier loop on the same images in the
same run, and the peak memory (PSS of the driver and every Ray process it started) at 1x and 10x the images.

    python jobs/bench_pipeline.py --n 512 --scale 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from pipeline.evaluate import PeakRSS


def bare_loop(root: Path, method: str, params: dict, batch: int) -> float:
    """Decode + purify the same shards in one process, no Ray: the ceiling for the pipeline."""
    import pyarrow.dataset as pads

    from pipeline.decode import decode_png
    from pipeline.purify import build_purifier, load_model

    model = load_model("fmnist-tiny", "cpu")
    purifier = build_purifier(method, model, params)
    table = pads.dataset(root / "shards", format="parquet").to_table(columns=["key", "image"])
    keys = table["key"].to_pylist()
    t0 = time.perf_counter()
    images = np.stack([decode_png(b) for b in table["image"].to_pylist()])
    for s in range(0, len(images), batch):
        purifier(images[s: s + batch], keys[s: s + batch], 0).uint8()
    return len(images) / (time.perf_counter() - t0)


def pipeline_run(root: Path, method: str, params: dict, batch: int) -> tuple[float, float, float]:
    """(img/s excluding startup, wall seconds, peak PSS MiB) of the real job on the same shards."""
    from pipeline.config import load_config
    from pipeline.job import run_sanitize

    out = root / f"out-{time.time_ns()}"
    cfg = load_config(overrides=[f"source.uri={root / 'shards'}", f"output.uri={out}", f"purify.method={method}",
                                 f"purify.params={json.dumps(params)}", f"resources.purify_batch_size={batch}",
                                 "output.resume=false"])
    with PeakRSS(interval=0.5, tree=True) as mem:
        t0 = time.perf_counter()
        s = run_sanitize(cfg)
        wall = time.perf_counter() - t0
    return s.images_per_s, wall, mem.mib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--method", default="sdedit")
    ap.add_argument("--params", default='{"t_start": 250, "steps": 10}')
    ap.add_argument("--mem-params", default='{"t_start": 250, "steps": 2}',
                    help="cheaper setting for the memory runs (memory does not depend on NFE)")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    import ray
    import torch

    from pipeline.demo import build_demo_shards

    params, mem_params = json.loads(args.params), json.loads(args.mem_params)
    ray.init(num_cpus=psutil.cpu_count(), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        small, big = Path(tmp) / "small", Path(tmp) / "big"
        build_demo_shards(small, n=args.n, n_shards=4)
        build_demo_shards(big, n=args.n * args.scale, n_shards=4 * args.scale)
        torch.set_num_threads(psutil.cpu_count())
        bare = bare_loop(small, args.method, params, args.batch)
        e2e, wall, _ = pipeline_run(small, args.method, params, args.batch)
        _, _, mem1 = pipeline_run(small, args.method, mem_params, args.batch)
        _, wall10, mem10 = pipeline_run(big, args.method, mem_params, args.batch)
    print(f"| measure | value |\n|---|---|\n"
          f"| bare purifier loop ({args.method} {params}), img/s | {bare:.1f} |\n"
          f"| end-to-end sanitize, img/s (wall {wall:.1f}s incl. startup) | {e2e:.1f} |\n"
          f"| ratio end-to-end / bare | {e2e / bare:.2f} |\n"
          f"| peak PSS, {args.n} images | {mem1:.0f} MiB |\n"
          f"| peak PSS, {args.n * args.scale} images ({wall10:.0f}s) | {mem10:.0f} MiB |\n"
          f"| ratio {args.scale}x / 1x | {mem10 / mem1:.2f} |")


if __name__ == "__main__":
    main()
