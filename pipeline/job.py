"""The sanitize job as one linear Ray Data plan, top to bottom:

    read -> decode -> purify + query + decide (one actor pool, one model per GPU) -> encode -> write
                                    |
                      black-box service (a few CPU actors, job-wide limits)

Linear on purpose: Ray Data's checkpointed resume only applies to Read -> maps -> Write. One purify pool whatever
the method: a vote's passes run inside the stage (pipeline/stages.py), so a plan never asks for k GPUs per
purifier. Before any work, preflight checks the source, the destination, the black box, the model, the method and
that the cluster can place the plan at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipeline.blackbox import BlackBoxUnavailable, InputSpec, open_blackbox
from pipeline.config import JobConfig
from pipeline.decode import decode_batch, is_empty_error
from pipeline.flows import SINK_MEANING, sinks_in_table
from pipeline.gate import gate_params, gate_threshold, top_probability
from pipeline.heap import releasing, worker_env
from pipeline.paths import absolute_uri, shipped_path
from pipeline.placement import PlacementError, PlanDemand, check_placement, plan_demand
from pipeline.progress import ProgressLine
from pipeline.requeue import parquet_files, release_retryable, uncommitted
from pipeline.service import ServiceHandle, start_service
from pipeline.sink import output_schema, to_output_batch
from pipeline.sources import (
    SourceSpec,
    checkpoint_config,
    duplicate_keys,
    inspect_source,
    mark_duplicate_keys,
    read_source,
    row_count,
)
from pipeline.stages import PurifyStage
from pipeline.storage import (
    StorageError,
    check_writable,
    describe,
    overlap,
    redact_userinfo,
    resolve_filesystem,
    uri_path,
)

log = logging.getLogger(__name__)
CHECKPOINT_DIR = "_ray_checkpoint"  # inside the output; '_' keeps it out of Parquet dataset discovery
GATE_FILE = "_vote_gate.json"  # the measured gate, so that a resumed run decides with the one its rows were
FENCE_S = 120.0  # how long a failed run waits for its own tasks before it raises


@dataclass
class Summary:
    rows_total: int
    rows_this_run: int
    errors: int
    flagged: int
    mean_nfe: float
    seconds: float
    images_per_s: float
    output: str
    retryable: int = 0  # error rows the next run retries (black box, budget, credentials)
    retried: int = 0  # error rows of earlier runs this run processed again
    queries: int = 0  # images sent to the black box in this run, answered or not (what its owner may count)
    budget_rejected: int = 0
    unet_share: float = 0.0  # share of the purify actors' wall time spent in the diffusion model
    gate: float | None = None  # the vote's original-label gate as measured on the job's first rows (if measured)
    sinks: list[dict] = field(default_factory=list)  # classes that absorb many others (pipeline/flows.py)

    def line(self, rerun: str = "rerun the same job to retry them") -> str:
        retry = f" ({self.retryable} retryable: {rerun})" if self.retryable else ""
        return (f"rows {self.rows_total} (this run {self.rows_this_run}), errors {self.errors}{retry}, "
                f"flagged {self.flagged}, mean NFE {self.mean_nfe:.1f}, {self.seconds:.1f}s, "
                f"{self.images_per_s:.1f} img/s, black-box queries {self.queries}, "
                f"model busy {100 * self.unet_share:.0f}%"
                + (f", gate {self.gate:.3f}" if self.gate is not None else "") + f" -> {self.output}"
                + "".join(f"; SINK: class {s['class']} absorbs {len(s['absorbed'])} of {s['others']} other classes"
                          for s in self.sinks))


def blackbox_uri(uri: str) -> str:
    """An `onnx:` path made absolute (a committed victim is found from any working directory)."""
    return f"onnx:{shipped_path(uri[5:]).resolve()}" if uri.startswith("onnx:") else uri


def blackbox_options(cfg: JobConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    b = cfg.blackbox
    spec = {"size": b.size, "channels": b.channels, "scale": b.scale, "input_name": b.input_name,
            "datatype": b.datatype}
    if b.uri.startswith("onnx:"):
        # One thread: the victim is small, and a local model that takes every core next to a busy purifier on the
        # same node slows both many times over.
        opts = {"threads": 1, "max_batch_size": b.max_batch_size, "query_budget": b.query_budget}
        return spec, {k: v for k, v in opts.items() if v is not None}
    opts = {"max_batch_size": b.max_batch_size, "max_concurrency": b.max_concurrency, "timeout_s": b.timeout_s,
            "retries": b.retries, "rate_limit_qps": b.rate_limit_qps, "query_budget": b.query_budget,
            "auth_env": b.auth_env, "header_env": b.header_env or None}
    return spec, {k: v for k, v in opts.items() if v is not None}


def count_output(fs: pafs.FileSystem, path: str, skip: set[str] | frozenset = frozenset()) -> int:
    """Rows in the output's Parquet files, leaving out the files in `skip` (see requeue.uncommitted)."""
    try:
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return 0
        files = [f for f in parquet_files(fs, path) if f not in skip]
        return pads.dataset(files, filesystem=fs, format="parquet").count_rows() if files else 0
    except (FileNotFoundError, OSError):
        return 0


def init_ray(cfg: JobConfig) -> None:
    import ray

    if not ray.is_initialized():
        # A cluster this job starts for itself skips the dashboard (a few hundred MB); a running cluster keeps its own.
        local = not (cfg.ray_address or os.environ.get("RAY_ADDRESS"))
        opts: dict[str, Any] = {"include_dashboard": False} if local else {}
        if env := worker_env():  # merged per variable with a submitted job's own runtime env
            opts["runtime_env"] = {"env_vars": env}
        ray.init(address=cfg.ray_address, ignore_reinit_error=True, log_to_driver=True, **opts)


@dataclass
class Preflight:
    spec: SourceSpec
    fs_in: pafs.FileSystem
    fs_out: pafs.FileSystem
    out_path: str
    id_column: str | None  # the reader-native unique column resume keys on
    image_size: int
    channels: int


def check_model(name: str, method: str, params: dict[str, Any]) -> tuple[int, int]:
    """Load the model on the CPU and build the method: a bad model name or method fails here, not in 100 actors.
    Returns the model's image size and channels."""
    from pipeline.purify import build_purifier, load_model

    model = load_model(name, "cpu")
    build_purifier(method, model, params)
    return model.image_size, model.channels


def check_model_elsewhere(cfg: JobConfig) -> tuple[int, int]:
    """`check_model` in a short-lived process: the driver never imports torch and diffusers, which would cost it
    a few hundred MB for the whole job."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(check_model, cfg.model.name, cfg.purify.method, dict(cfg.purify.params)).result()


def source_spec(cfg: JobConfig) -> SourceSpec:
    s = cfg.source
    return SourceSpec(uri=absolute_uri(s.uri), format=s.format, image_column=s.image_column,
                      key_column=s.key_column, label_column=s.label_column, endpoint_url=s.endpoint_url,
                      limit=s.limit, sample_fraction=s.sample_fraction, sample_seed=s.sample_seed,
                      max_image_bytes=s.max_image_bytes)


def preflight(cfg: JobConfig) -> Preflight:
    """Everything that can be wrong before any work starts: source, destination, black box, model, method."""
    if cfg.model.device.startswith("cuda:") and cfg.model.device != "cuda:0":
        raise ValueError(f"model.device={cfg.model.device}: Ray gives each purify actor a GPU of its own, which it "
                         "sees as cuda:0; use model.device=cuda (or auto)")
    spec = source_spec(cfg)
    fs_in, _ = resolve_filesystem(spec.uri, spec.endpoint_url)
    info = inspect_source(spec, fs_in)
    out_uri = absolute_uri(cfg.output.uri)
    fs_out, out_path = resolve_filesystem(out_uri, cfg.output.endpoint_url)
    if overlap(fs_in, info.root, fs_out, out_path):
        # A rerun would list its own output files as source shards: every key would repeat, and the rows already
        # written would be taken back as duplicate-key errors.
        raise StorageError(f"the output {describe(fs_out, out_path)} and the source {describe(fs_in, info.root)} "
                           "overlap (one is the other or lies inside it): put output.uri outside source.uri")
    check_writable(fs_out, out_path)
    spec_bb, opts = blackbox_options(cfg)
    bb = open_blackbox(blackbox_uri(cfg.blackbox.uri), InputSpec(**spec_bb), **opts)
    try:
        bb.check()
        if cfg.blackbox.query_budget != 0:
            bb.probe()  # one tiny /infer with the job's credentials: a ready endpoint can still refuse the token
    finally:
        bb.close()
    size, channels = check_model_elsewhere(cfg)
    return Preflight(spec, fs_in, fs_out, out_path, info.id_column, size, channels)


def source_rows(pre: Preflight) -> int | None:
    """How many rows this job reads, where that is known up front (see `row_count`); None when a sample makes it a
    draw."""
    if pre.spec.sampled:
        return None
    total = row_count(pre.spec, pre.fs_in)
    if total is None:
        return None
    return min(total, pre.spec.limit) if pre.spec.limit else total


def demand_bundles(demand: PlanDemand, purifiers: int, task_cpus: float) -> list[dict[str, float]]:
    """What to ask an autoscaler for: the purifiers, the service's actors and a CPU per Ray Data task."""
    purifier = {"GPU": demand.gpus_per_purifier, "CPU": demand.cpus_per_purifier} if demand.gpus_per_purifier \
        else {"CPU": max(demand.cpus_per_purifier, 1.0)}
    service = [{"CPU": demand.cpus_per_blackbox}] * demand.blackbox_actors if demand.cpus_per_blackbox else []
    return [purifier] * purifiers + service + [{"CPU": 1.0}] * int(task_cpus)


def cluster_demand(cfg: JobConfig):
    import ray

    total = ray.cluster_resources()
    has_gpus = total.get("GPU", 0) > 0
    if cfg.resources.gpus_per_actor is None and not has_gpus and cfg.resources.wait_for_nodes_s > 0:
        # "1 GPU when the cluster has GPUs" cannot be read off a cluster whose GPU nodes an autoscaler has yet to add
        raise PlacementError("resources.gpus_per_actor is null and the cluster has no GPU (yet): on an autoscaling "
                             "cluster (resources.wait_for_nodes_s > 0) say what a purifier needs: 1 for a GPU "
                             "purifier (the autoscaler adds GPU nodes for it), 0 to purify on CPUs")
    cpu_free = any(n.get("Alive") and n.get("Resources", {}).get("CPU", 0.0) <= 0 for n in ray.nodes())
    return plan_demand(cfg, has_gpus, total.get("CPU", 0.0), cpu_free_node=cpu_free)


def ensure_placeable(cfg: JobConfig) -> bool:
    """Fail fast when the plan can never be placed: on the nodes alive now or, with `resources.wait_for_nodes_s`,
    on what an autoscaler adds within that time (asked for through `request_resources`). Returns whether it asked:
    the request stands until withdrawn (`withdraw_resource_request`), keeping its nodes up after the job."""
    import ray
    from ray.autoscaler.sdk import request_resources

    def alive() -> list[dict[str, float]]:
        return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]

    demand = cluster_demand(cfg)
    need = cfg.resources.purify_actors
    # Read and write tasks take a CPU each; a resumed job adds Ray's checkpoint-filter actor (1 CPU).
    task_cpus = 2.0 if cfg.output.resume else 1.0
    deadline = time.monotonic() + cfg.resources.wait_for_nodes_s
    asked = False
    while True:
        try:
            check_placement(demand, alive(), min_purifiers=need, task_cpus=task_cpus,
                            largest_task=max(1.0, cfg.resources.decode_cpus))
            return asked
        except PlacementError:
            if time.monotonic() >= deadline:
                if asked:
                    withdraw_resource_request()
                raise
            if not asked:
                request_resources(bundles=demand_bundles(demand, need, task_cpus))
                asked = True
                log.info("waiting up to %.0f s for the autoscaler to add: %s", cfg.resources.wait_for_nodes_s,
                         demand.describe())
            time.sleep(2.0)


def withdraw_resource_request() -> None:
    """Ray keeps an autoscaler request until another replaces it: an empty one lets idle nodes go (idle timeouts)
    on a long-lived cluster once the job is over. The request is the cluster's, not the job's (Ray's API has one),
    so this also withdraws what another job waiting on the same cluster asked for; its work still scales the
    cluster through its own pending tasks."""
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=[])
    except Exception as e:  # noqa: BLE001 - the job's own outcome matters more; the log says what to do
        log.warning("could not withdraw the autoscaler request (%s): on a long-lived cluster its nodes stay up "
                    "until the next job's request replaces it", e)


def start_blackbox(cfg: JobConfig) -> ServiceHandle:
    spec, opts = blackbox_options(cfg)
    if opts.get("query_budget"):
        opts["query_budget"] -= 1  # preflight's probe was one billed query
    return start_service(blackbox_uri(cfg.blackbox.uri), spec, opts, cfg.resources.query_actors,
                         cfg.resources.query_cpus, cfg.blackbox.max_concurrency)


def build_plan(cfg: JobConfig, spec: SourceSpec, fs_in: pafs.FileSystem, model_size: int, model_channels: int,
               service: ServiceHandle, params: dict[str, Any] | None = None):
    """The Ray Data plan up to (not including) the write; `params`: the method's, as measured (default: the
    config's)."""
    from ray.data import ActorPoolStrategy

    r = cfg.resources
    demand = cluster_demand(cfg)
    purify_kw = {"model": cfg.model.name, "device": cfg.model.device, "dtype": cfg.model.dtype,
                 "method": cfg.purify.method, "params": dict(cfg.purify.params if params is None else params),
                 "seed": cfg.purify.seed,
                 "service": service.names, "namespace": service.namespace, "torch_threads": r.torch_threads}
    pool = ActorPoolStrategy(min_size=r.purify_actors, max_size=r.max_purify_actors or r.purify_actors)

    ds = read_source(spec, fs_in)
    dups = duplicate_keys(spec, fs_in)
    if dups:
        # A repeated key is an error row on every row that carries it (see mark_duplicate_keys), never a silent
        # duplicate in the output nor a row that resume would skip as done.
        log.warning("%d keys repeat in the source (%d rows): those rows become 'duplicate key' error rows",
                    len(dups), sum(dups.values()))
        ds = ds.map_batches(mark_duplicate_keys, batch_format="pyarrow", batch_size=None, fn_kwargs={"counts": dups})
    decode = {"size": model_size, "channels": model_channels, "policy": cfg.source.decode_policy,
              "max_bytes": cfg.source.max_image_bytes}
    ds = ds.map_batches(releasing(decode_batch), batch_size=r.decode_batch_size, batch_format="numpy",
                        num_cpus=r.decode_cpus, fn_kwargs=decode)
    return ds.map_batches(PurifyStage, compute=pool, num_gpus=demand.gpus_per_purifier,
                          num_cpus=demand.cpus_per_purifier, batch_size=r.purify_batch_size, batch_format="numpy",
                          fn_constructor_kwargs=purify_kw)


def measured_gate(cfg: JobConfig) -> tuple[float, int] | None:
    """(quantile, rows) when the method is a vote whose original-label gate is measured on the job's first rows."""
    params = cfg.purify.params
    votes = params.get("original_votes")  # missing or None: the vote's default ballots (see Cascade)
    if cfg.purify.method != "cascade" or votes == 0:
        return None
    quantile, below, rows = gate_params(params)
    # below given with the quantile: an earlier measurement, kept
    return None if quantile is None or below is not None else (float(quantile), int(rows))


def first_images(cfg: JobConfig, spec: SourceSpec, fs_in: pafs.FileSystem, size: int, channels: int,
                 rows: int) -> np.ndarray:
    """The images among the source's first `rows` rows that decode, in source order (a rerun reads the same ones);
    rows that fail to decode are left out, not replaced, so that the gate's rows do not depend on how many did."""
    from ray.data import DataContext

    # A dataset keeps a copy of the context it was made under: order is asked for before the plan is built.
    opts = DataContext.get_current().execution_options
    ordered, opts.preserve_order = opts.preserve_order, True  # the first rows, not the first to arrive
    try:
        ds = read_source(spec, fs_in).limit(rows)
        ds = ds.map_batches(decode_batch, batch_size=rows, batch_format="numpy", num_cpus=cfg.resources.decode_cpus,
                            fn_kwargs={"size": size, "channels": channels, "policy": cfg.source.decode_policy,
                                       "max_bytes": cfg.source.max_image_bytes})
        batch = ds.take_batch(rows, batch_format="numpy")
    finally:
        opts.preserve_order = ordered
    ok = [is_empty_error(e) for e in batch["error"]]
    return np.ascontiguousarray(batch["image"][ok])


def calibrate_gate(quantile: float, images: np.ndarray, service: ServiceHandle) -> tuple[float, bool]:
    """Ask the black box about `images` (billed like any query) and return the gate, the `quantile` of its top
    probability, and whether every image was answered. Shut (0.0) when it gives labels only or nothing could be
    measured."""
    import ray

    if not len(images):
        log.warning("no decodable image among the source's first rows: the vote's original-label gate stays shut")
        return 0.0, True
    answer = ray.get(service.actors[0].predict.remote(images))
    answered = np.asarray(answer.labels) >= 0
    if not answered.any():
        # A gate measured on nothing would shut for the whole run, and the rows it decides would never be redone.
        reason = next((e for e in answer.errors if e), "no answer")
        raise BlackBoxUnavailable(f"the black box answered none of the {len(images)} images the vote's gate is "
                                  f"measured on ({reason}): nothing was purified; rerun once it answers")
    if not answered.all():
        log.warning("the black box answered %d of the %d images the vote's gate is measured on: measured on those, "
                    "and measured again by the next run", int(answered.sum()), len(images))
    top = top_probability(answer.labels, answer.scores)
    if top is None:
        log.warning("the black box gives labels only: the vote's original-label gate stays shut")
    return gate_threshold(top, quantile), bool(answered.all())


def gate_identity(cfg: JobConfig) -> str:
    """What the gate was measured on besides its quantile and rows: the black box, its input, and which rows are the
    source's first (its location, its sample). A digest, so that no URI lands in the output folder."""
    b, s = cfg.blackbox, cfg.source
    what = [b.uri, b.size, b.channels, b.scale, b.input_name, b.datatype, absolute_uri(s.uri), s.format,
            s.sample_fraction, s.sample_seed, s.decode_policy]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def saved_gate(fs: pafs.FileSystem, out_path: str, quantile: float, rows: int, identity: str) -> float | None:
    """The gate an earlier run of this output measured with the same quantile, rows and `gate_identity`, if any."""
    try:
        with fs.open_input_stream(f"{out_path.rstrip('/')}/{GATE_FILE}") as f:
            saved = json.loads(f.read(4096))
    except (FileNotFoundError, OSError, ValueError):
        return None
    if (saved.get("original_quantile"), saved.get("calibration_rows"), saved.get("measured_for")) != (
            quantile, rows, identity):
        return None
    gate = saved.get("original_below")
    return float(gate) if isinstance(gate, (int, float)) and 0.0 <= gate <= 1.0 else None


def save_gate(fs: pafs.FileSystem, out_path: str, quantile: float, rows: int, identity: str, gate: float,
              measured_on: int) -> None:
    fs.create_dir(out_path, recursive=True)
    with fs.open_output_stream(f"{out_path.rstrip('/')}/{GATE_FILE}") as f:
        f.write(json.dumps({"original_quantile": quantile, "calibration_rows": rows, "measured_for": identity,
                            "original_below": gate, "measured_on": measured_on}).encode())


def wait_for_tasks_to_end(cpus_before: float, timeout_s: float = FENCE_S) -> bool:
    """Block until the cluster's free CPUs are back to `cpus_before` (what was free before the run); False on timeout.

    Why: when a Ray Data job fails, its executor cancels the tasks still running without waiting for them
    (`shutdown(force=False)`), and a write task inside a pyarrow S3 call only sees the cancel once that call
    returns, so it can still land a file after the job has raised. A rerun in the same driver (a notebook, a
    scheduled audit, a test) that starts before that file lands cleans the checkpoint's pending files first and then
    writes those rows again: duplicates. Waiting for the failed run's tasks closes that window."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0.0) >= cpus_before - 1e-6:
            return True
        time.sleep(0.25)
    return False


def _storage_failure(err: OSError, source: str, output: str, resumable: bool) -> StorageError:
    cause = getattr(err, "cause", None) or err  # RayTaskError keeps the worker's exception as .cause
    text = (str(cause).strip().splitlines() or [""])[0][:300]
    then = ("files already committed are kept: rerun the same job once storage is back to resume" if resumable
            else "this job cannot resume: a rerun starts over")
    return StorageError(f"the job stopped on a storage error (source {source}, output {output}): "
                        f"{type(cause).__name__}: {text}; {then}")


def run_sanitize(cfg: JobConfig) -> Summary:
    """Validate, build the plan, stream it to Parquet, and summarise what the output now holds."""
    pre = preflight(cfg)
    init_ray(cfg)
    asked = ensure_placeable(cfg)
    try:
        return _sanitize(cfg, pre)
    finally:
        if asked:
            withdraw_resource_request()


def _sanitize(cfg: JobConfig, pre: Preflight) -> Summary:
    import ray
    from ray.data import DataContext

    spec, fs_in, fs_out, out_path = pre.spec, pre.fs_in, pre.fs_out, pre.out_path
    size, channels = pre.image_size, pre.channels

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # one line of our own instead (pipeline/progress.py)
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # off on purpose: spare the user Ray's advice to turn them on
    ctx.target_max_block_size = cfg.resources.max_block_kib * 1024
    # Read before resume is set up: with a checkpoint, Ray Data would skip rows already done, and a rerun would
    # measure the gate on other rows than the first run did.
    gate_spec = measured_gate(cfg)
    identity = gate_identity(cfg)
    gate = saved_gate(fs_out, out_path, *gate_spec, identity) if gate_spec and cfg.output.resume else None
    calib = first_images(cfg, spec, fs_in, size, channels, gate_spec[1]) if gate_spec and gate is None else None
    id_col = pre.id_column
    retried = 0
    ctx.checkpoint_config = None
    cpus_free = ray.available_resources().get("CPU", 0.0)
    t0 = time.time()
    service = start_blackbox(cfg)
    try:
        params = dict(cfg.purify.params)
        if gate_spec:
            if gate is None and calib is not None:
                gate, complete = calibrate_gate(gate_spec[0], calib, service)
                if complete:  # a gate measured while the black box failed must not outlive that failure
                    save_gate(fs_out, out_path, *gate_spec, identity, gate, len(calib))
                log.info("vote gate: %.4f, the %.2f quantile of the black box's top probability on the first %d "
                         "images", gate, gate_spec[0], len(calib))
            params["original_below"] = gate
            params["original_quantile"] = gate_spec[0]  # with it, original_below reads as its measurement
        # Only once the black box has answered (the service started, the gate measured): a run that stops on an
        # outage before any work leaves the retryable rows of the last run in the output, where they show.
        doomed: set[str] = set()  # files of a write cut short, which Ray deletes when the plan starts
        if cfg.output.resume and id_col:
            # A URI, not the filesystem path: checkpoint_config resolves it against fs_out itself.
            out_uri = absolute_uri(cfg.output.uri).rstrip("/")
            # Keyed on the source's own key column, a key that repeats now (or no longer does) changes rows done.
            dups = duplicate_keys(spec, fs_in) if id_col == spec.key_column else None
            checkpoint = f"{out_path.rstrip('/')}/{CHECKPOINT_DIR}"
            retried = release_retryable(fs_out, out_path, checkpoint, id_col, dups).rows
            doomed = uncommitted(fs_out, out_path, checkpoint)
            ctx.checkpoint_config = checkpoint_config(spec, f"{out_uri}/{CHECKPOINT_DIR}", fs_out)
        elif cfg.output.resume:
            log.warning("source has no unique id column: this job cannot resume; a rerun reprocesses every row")
        before = count_output(fs_out, out_path, doomed)
        ds = build_plan(cfg, spec, fs_in, size, channels, service, params)
        ds = ds.map_batches(releasing(to_output_batch), batch_format="numpy", batch_size=cfg.resources.query_batch_size,
                            fn_kwargs={"keep_orig": cfg.output.keep_original,
                                       "id_column": id_col if id_col != "key" else None})
        total = source_rows(pre)
        with ProgressLine(service.rows_decided, None if total is None else max(total - before, 0)):
            ds.write_parquet(out_path, filesystem=fs_out, mode="append")
        bb_stats = service.stats()
    except Exception as e:
        service.close()
        if not wait_for_tasks_to_end(cpus_free):
            log.warning("tasks of the failed run were still running after %.0f s (or the cluster is shared): a "
                        "rerun started at once may write some rows twice; wait for them before rerunning", FENCE_S)
        if isinstance(e, OSError):
            # Ray re-raises a worker's OSError as RayTaskError(OSError), still an OSError: storage that fails
            # mid-job (endpoint gone, credentials expired) ends the job with one StorageError naming where.
            raise _storage_failure(e, describe(fs_in, uri_path(spec.uri)), describe(fs_out, out_path),
                                   ctx.checkpoint_config is not None) from e
        raise
    finally:
        ctx.checkpoint_config = None  # also after a failure: the next Ray Data job in this process must not inherit it
    service.close()
    seconds = time.time() - t0

    columns = ["error", "flagged", "nfe", "retryable", "pred_orig", "pred_purified"]
    files = parquet_files(fs_out, out_path)
    if files:
        dataset = pads.dataset(files, filesystem=fs_out, format="parquet")
        table = dataset.to_table(columns=[c for c in columns if c in dataset.schema.names])
    else:
        table = pa.table({})
    if "error" not in table.column_names:
        # Nothing written, ever (Ray writes no file for an empty dataset: a sample that drew no row, an empty
        # source): zero rows, not a failure.
        table = output_schema().empty_table().select(columns)
    total = table.num_rows
    errors = total - table["error"].null_count
    flagged = int(sum(1 for f in table["flagged"].to_pylist() if f))
    retryable = int(sum(1 for f in table["retryable"].to_pylist() if f)) if "retryable" in table.column_names else 0
    nfe = table["nfe"].to_numpy()
    this_run = total - before  # `before` was counted after the retryable rows left the output
    s = Summary(rows_total=total, rows_this_run=this_run, errors=errors, flagged=flagged,
                mean_nfe=float(nfe.mean()) if total else 0.0, seconds=seconds,
                images_per_s=this_run / seconds if seconds > 0 else 0.0, output=redact_userinfo(cfg.output.uri),
                retryable=retryable, retried=retried, queries=int(bb_stats.get("images", 0)),
                budget_rejected=int(bb_stats.get("budget_rejected", 0)),
                unet_share=float(bb_stats.get("unet_share", 0.0)), gate=gate)
    if cfg.sink_check.enabled:
        sinks = sinks_in_table(table, **cfg.sink_check.settings)
        s.sinks = [sink.as_dict() for sink in sinks]
        for sink in sinks:
            log.error("%s: %s", sink.describe(), SINK_MEANING)
    log.info("summary: %s", asdict(s))
    return s
