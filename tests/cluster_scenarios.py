"""Cluster shapes a test cannot build inside the test session's own Ray: each scenario runs in a fresh process
(`python -m tests.cluster_scenarios NAME WORKDIR`), starts its own Ray with logical GPUs, and prints one JSON line
of facts for the test to check. Logical GPUs place actors exactly as a GPU cluster would; the work runs on CPU."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import load_config
from pipeline.job import run_sanitize
from pipeline.placement import PlacementError
from tests.plugins.s3 import make_fmnist_shards

# The default method (the vote) with its default parameters; only the device is pinned, since these GPUs are logical.
DEFAULT_VOTE = ["model.device=cpu", "resources.purify_batch_size=16", "resources.decode_batch_size=16",
                "resources.query_batch_size=16"]


def _output(out: Path, column: str) -> list:
    values: list = []
    for path in sorted(out.glob("*.parquet")):
        try:
            values += pq.read_table(path, columns=[column])[column].to_pylist()
        except pa.ArrowInvalid:  # not one of the job's files (a scenario's stray one)
            continue
    return values


def keys_in(out: Path) -> list[str]:
    return _output(out, "key")


def errors_in(out: Path) -> int:
    return sum(e is not None for e in _output(out, "error"))


def purify_actors_started() -> int:
    import ray

    return sum(1 for a in ray._private.state.actors().values() if "PurifyStage" in a["ActorClassName"])


def one_gpu(work: Path) -> dict:
    """ray.init(num_gpus=1): the default vote on one logical GPU, then a plan asking 2 one-GPU purifiers."""
    import ray

    src = make_fmnist_shards(pafs.LocalFileSystem(), str(work / "src"), n_shards=2, per_shard=12, fmt="parquet")
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    cfg = load_config(overrides=[f"source.uri={src.root}", f"output.uri={work / 'out'}", *DEFAULT_VOTE])
    summary = run_sanitize(cfg)
    facts = {"expected": sorted(src.expected), "keys": keys_in(work / "out"), "errors": errors_in(work / "out"),
             "purify_actors": purify_actors_started(), "method": cfg.purify.method, "mean_nfe": summary.mean_nfe}
    try:
        run_sanitize(load_config(overrides=[f"source.uri={src.root}", f"output.uri={work / 'out2'}", *DEFAULT_VOTE,
                                            "resources.gpus_per_actor=1", "resources.purify_actors=2"]))
        facts["placement_error"] = None
    except PlacementError as e:
        facts["placement_error"] = str(e)
    # Refused in preflight means before Ray Data started anything: no purify actor beyond the first run's.
    facts["purify_actors_after_refusal"] = purify_actors_started()
    facts["out2_written"] = (work / "out2").exists() and any((work / "out2").glob("*.parquet"))
    return facts


def three_nodes(work: Path) -> dict:
    """The shape of cluster/raycluster.yaml: a head with 0 CPUs, a node with 1 GPU, a CPU node. The default vote
    runs; then the GPU node is removed mid-job and a fresh one added: the job finishes, or a rerun does."""
    import ray
    from ray.cluster_utils import Cluster

    src = make_fmnist_shards(pafs.LocalFileSystem(), str(work / "src"), n_shards=4, per_shard=12, fmt="parquet")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    base = [f"source.uri={src.root}", *DEFAULT_VOTE, "resources.max_block_kib=16"]
    run_sanitize(load_config(overrides=[*base, f"output.uri={work / 'out'}"]))
    facts: dict = {"expected": sorted(src.expected), "keys": keys_in(work / "out"),
                   "errors": errors_in(work / "out")}

    out = work / "lost"
    cfg = load_config(overrides=[*base, f"output.uri={out}"])
    result: dict = {}

    def job() -> None:
        try:
            run_sanitize(cfg)
            result["ok"] = True
        except Exception as e:  # noqa: BLE001 - the scenario reports what happened; the test decides
            result["error"] = f"{type(e).__name__}: {str(e)[:300]}"

    t = threading.Thread(target=job)
    t.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and t.is_alive() and not list(out.glob("*.parquet")):
        time.sleep(0.1)
    facts["removed_mid_job"] = t.is_alive()
    cluster.remove_node(gpu_node)
    cluster.add_node(num_cpus=2, num_gpus=1)
    t.join(timeout=600)
    facts["first_run"] = result
    runs = 1
    while runs < 3 and (not result.get("ok") or errors_in(out)):
        run_sanitize(cfg)  # a rerun resumes: retryable error rows and missing rows are done again
        result = {"ok": True}
        runs += 1
    facts.update(runs=runs, lost_keys=keys_in(out), lost_errors=errors_in(out))
    ray.shutdown()
    cluster.shutdown()
    return facts


def late_gpu(work: Path, stray_output: bool = False) -> dict:
    """An autoscaling cluster as a job first sees it: no GPU node yet. With `resources.wait_for_nodes_s`, preflight
    waits; a GPU node joins a few seconds later (standing in for the autoscaler) and the job runs on it. With
    `stray_output`, a file in the output folder that is not Parquet ends the job after preflight asked the
    autoscaler (resume reads the output then) and before the plan runs."""
    import ray
    from ray.cluster_utils import Cluster

    src = make_fmnist_shards(pafs.LocalFileSystem(), str(work / "src"), n_shards=1, per_shard=12, fmt="parquet")
    if stray_output:
        (work / "out").mkdir()
        (work / "out" / "notes.parquet").write_bytes(b"not a parquet file")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    ray.init(address=cluster.address, log_to_driver=False)

    cfg = load_config(overrides=[
        f"source.uri={src.root}", f"output.uri={work / 'out'}", *DEFAULT_VOTE, "resources.gpus_per_actor=1",
        "resources.wait_for_nodes_s=120", "purify.params={t_start: 100, steps: 2, locate_steps: 1, guide_steps: 1}"])
    result: dict = {}

    def job() -> None:
        try:
            run_sanitize(cfg)
        except Exception as e:  # noqa: BLE001 - the scenario reports what happened; the test decides
            result["error"] = f"{type(e).__name__}: {str(e)[:300]}"

    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    def request() -> list | None:  # what the job asks the autoscaler for (v1 autoscaler: a JSON list in the GCS KV)
        raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
        return None if raw is None else json.loads(raw)

    t0 = time.monotonic()
    t = threading.Thread(target=job)
    t.start()
    # The autoscaler's part: a GPU node joins once the job asks for one (or after 60 s, for the test to report).
    asked = None
    while asked is None and t.is_alive() and time.monotonic() - t0 < 60:
        time.sleep(0.5)
        asked = request()
    cluster.add_node(num_cpus=2, num_gpus=1)  # from the main thread: Ray's node start needs it
    t.join(timeout=300)
    facts = {"expected": sorted(src.expected), "keys": keys_in(work / "out"), "errors": errors_in(work / "out"),
             "seconds": time.monotonic() - t0, "asked": asked, "standing_request": request(), **result}
    ray.shutdown()
    cluster.shutdown()
    return facts


SCENARIOS = {"one_gpu": one_gpu, "three_nodes": three_nodes, "late_gpu": late_gpu,
             "late_gpu_stray_output": lambda work: late_gpu(work, stray_output=True)}

if __name__ == "__main__":
    name, workdir = sys.argv[1], Path(sys.argv[2])
    print("SCENARIO " + json.dumps(SCENARIOS[name](workdir)), flush=True)
