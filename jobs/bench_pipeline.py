"""Pipeline overhead and memory: end-to-end img/s of `sanitize` vs the bare in-process loop of the same method on
the same images and the same black box (decode, purify, query, decide: no Ray), in the same run; the share of the
purify actor's wall time spent in the diffusion model; and the peak memory (PSS of the driver and every Ray process
it started) at 1x and 10x the images.

    python jobs/bench_pipeline.py                      # the default method on 1,000 demo images, memory at 10x
    python jobs/bench_pipeline.py --device cuda        # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from pipeline.evaluate import PeakRSS


def job_config(root: Path, method: str, params: dict, batch: int, device: str):
    from pipeline.config import load_config

    return load_config(overrides=[f"source.uri={root / 'shards'}", f"output.uri={root / f'out-{time.time_ns()}'}",
                                  f"purify.method={method}", f"purify.params={json.dumps(params)}",
                                  f"resources.purify_batch_size={batch}", f"model.device={device}",
                                  "output.resume=false"])


def bare_loop(root: Path, method: str, params: dict, batch: int, device: str) -> float:
    """Decode, purify, query and decide on the same shards in one process, no Ray: the ceiling for the pipeline.
    The same rounds as the job's stage (`cascade.drive`), the same black box."""
    import pyarrow.dataset as pads

    from pipeline.blackbox import InputSpec, open_blackbox
    from pipeline.decode import decode_png
    from pipeline.evaluate import calibrate_vote
    from pipeline.job import blackbox_options, blackbox_uri
    from pipeline.purify import Cascade, build_purifier, load_model
    from pipeline.purify.cascade import drive, one_pass_steps
    from pipeline.purify.models import pick_device
    from pipeline.service import fit_to_spec

    cfg = job_config(root, method, params, batch, device)
    model = load_model(cfg.model.name, pick_device(device))
    built = build_purifier(method, model, params)
    spec, opts = blackbox_options(cfg)
    bb = open_blackbox(blackbox_uri(cfg.blackbox.uri), InputSpec(**spec), **opts)
    table = pads.dataset(root / "shards", format="parquet").to_table(columns=["key", "image"])
    keys = table["key"].to_pylist()
    t0 = time.perf_counter()
    images = np.stack([decode_png(b) for b in table["image"].to_pylist()])
    calibrate_vote(built, lambda a: bb.predict(fit_to_spec(a, bb.spec)), images)  # the job's first-rows gate
    for s in range(0, len(images), batch):
        x, k = images[s: s + batch], keys[s: s + batch]
        if isinstance(built, Cascade):
            built.run(x, k, cfg.purify.seed, lambda a: bb.predict(fit_to_spec(a, bb.spec)))
        else:
            drive(one_pass_steps(x, cfg.purify.seed), x, k, built, lambda a: bb.predict(fit_to_spec(a, bb.spec)))
    return len(images) / (time.perf_counter() - t0)


def pipeline_run(root: Path, method: str, params: dict, batch: int, device: str):
    """(summary, wall seconds) of the real job on the same shards, in this process's Ray."""
    from pipeline.job import run_sanitize

    cfg = job_config(root, method, params, batch, device)
    t0 = time.perf_counter()
    s = run_sanitize(cfg)
    return s, time.perf_counter() - t0


def memory_run(root: Path, method: str, params: dict, batch: int, device: str) -> tuple[float, float]:
    """(peak PSS MiB, wall seconds) of `python -m pipeline sanitize` as a user runs it: its own driver process and
    the local Ray cluster it starts, sampled every half second."""
    cmd = [sys.executable, "-m", "pipeline", "sanitize", f"source.uri={root / 'shards'}",
           f"output.uri={root / f'mem-{time.time_ns()}'}", f"purify.method={method}",
           f"purify.params={json.dumps(params)}", f"resources.purify_batch_size={batch}", f"model.device={device}",
           "output.resume=false"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "RAY_ADDRESS": ""})
    with PeakRSS(interval=0.5, tree=True, pid=proc.pid) as mem:
        proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}")
    return mem.mib, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--method", default="cascade", help="default: the job's default method, the vote")
    ap.add_argument("--params", default="{}", help="JSON; default: the method's own defaults")
    ap.add_argument("--mem-params", default='{"t_start": 100, "steps": 2, "locate_steps": 1, "guide_steps": 1}',
                    help="cheaper setting for the memory runs (memory does not depend on NFE)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    import ray
    import torch

    from pipeline.demo import build_demo_shards
    from pipeline.heap import worker_env

    params, mem_params = json.loads(args.params), json.loads(args.mem_params)
    ray.init(num_cpus=psutil.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": worker_env()})  # the workers a user's job gets
    with tempfile.TemporaryDirectory() as tmp:
        small, big = Path(tmp) / "small", Path(tmp) / "big"
        build_demo_shards(small, n=args.n, n_shards=4)
        build_demo_shards(big, n=args.n * args.scale, n_shards=4 * args.scale)
        torch.set_num_threads(psutil.cpu_count())
        bare = bare_loop(small, args.method, params, args.batch, args.device)
        s, wall = pipeline_run(small, args.method, params, args.batch, args.device)
        ray.shutdown()  # the memory runs start their own cluster, as a user's job does
        mem1, _ = memory_run(small, args.method, mem_params, args.batch, args.device)
        mem10, wall10 = memory_run(big, args.method, mem_params, args.batch, args.device)
    e2e = s.images_per_s
    print(f"| measure | value |\n|---|---|\n"
          f"| bare in-process loop ({args.method} {params or 'defaults'}, mean NFE {s.mean_nfe:.1f}), img/s "
          f"| {bare:.1f} |\n"
          f"| end-to-end sanitize, img/s (wall {wall:.1f}s incl. startup) | {e2e:.1f} |\n"
          f"| ratio end-to-end / bare | {e2e / bare:.2f} |\n"
          f"| share of the purify actor's wall time in the diffusion model | {s.unet_share:.2f} |\n"
          f"| peak PSS of `sanitize` (driver + its Ray cluster), {args.n} images | {mem1:.0f} MiB |\n"
          f"| peak PSS, {args.n * args.scale} images ({wall10:.0f}s) | {mem10:.0f} MiB |\n"
          f"| ratio {args.scale}x / 1x | {mem10 / mem1:.2f} |")


if __name__ == "__main__":
    main()
