"""Reliability and security of the sanitize job, each fault injected into real components.

Faults: a black box failing a fifth of its calls (503, 429 + Retry-After, connection resets, timeouts), a purify
actor process killed mid-job, an S3 endpoint that is down before a job and one that goes down mid-write, a shard of
hostile or odd images (plus a key repeated across shards), and untrusted artefacts (pickled weights, a pickled
training checkpoint, a YAML config with Python tags, credentials that must never be echoed).

A killed driver and its rerun are tested in tests/test_pipeline_e2e.py; the decode -> encode round trip and the
output schema have Hypothesis property tests in tests/test_sources_decode.py.

Run with ``-s`` to see one ``[reliability]`` line per fault: rows in, rows out, error rows, duplicate keys.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.blackbox import BlackBoxUnavailable
from pipeline.config import load_config
from pipeline.decode import decode_png, encode_png
from pipeline.job import run_sanitize
from pipeline.storage import StorageError
from tests.plugins.s3 import S3Server, make_fmnist_shards
from tests.test_pipeline_e2e import FAST, assert_exactly_once, read_output

REPO = Path(__file__).resolve().parents[1]
LOCAL = pafs.LocalFileSystem()


def report(fault: str, rows_in: int, table: pa.Table | None) -> dict:
    """Print one line of the fault table (visible with -s) and return the numbers."""
    keys = table["key"].to_pylist() if table is not None else []
    errors = table.num_rows - table["error"].null_count if table is not None else 0
    dups = sum(c - 1 for c in Counter(keys).values() if c > 1)
    numbers = {"rows_in": rows_in, "rows_out": len(keys), "errors": errors, "duplicates": dups}
    print(f"\n[reliability] {fault}: " + ", ".join(f"{k} {v}" for k, v in numbers.items()))
    return numbers


def job_config(src: str, out: str, *extra: str, endpoint: str | None = None):
    ends = [f"source.endpoint_url={endpoint}", f"output.endpoint_url={endpoint}"] if endpoint else []
    return load_config(overrides=[f"source.uri={src}", f"output.uri={out}", "purify.method=sdedit", *FAST, *ends,
                                  *extra])


def run_in_thread(cfg) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target() -> None:
        try:
            result["summary"] = run_sanitize(cfg)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            result["error"] = e

    t = threading.Thread(target=target, daemon=True, name="run_sanitize")
    t.start()
    return t, result


# ---------------------------------------------------------------------------------------------------------------
# 1. A black box that fails 20% of its calls.


def test_flaky_black_box_job_completes_and_exhausted_rows_are_error_rows(ray_local, tmp_path, flaky_v2_server):
    src = make_fmnist_shards(LOCAL, str(tmp_path / "src"), n_shards=1, per_shard=48, fmt="parquet")
    # One batch, sent as 4-image requests one after another (max_concurrency 1), so requests arrive in query order
    # and the schedule decides: preflight's probe ok; then the first four queries with blackbox.retries=1 (2 tries
    # each): 503+503 -> fails; 429 (Retry-After 1) + ok -> succeeds on retry; reset+reset -> fails; slow (4 s >
    # timeout_s 2) + ok -> succeeds on retry. The other requests draw the 20% failure rate over all four modes.
    srv = flaky_v2_server(fail_rate=0.2, seed=0, retry_after="1", slow_s=4.0,
                          schedule=["ok", "503", "503", "429", "ok", "reset", "reset", "slow", "ok"])
    cfg = job_config(src.root, str(tmp_path / "out"), f"blackbox.uri={srv.url}", "blackbox.retries=1",
                     "blackbox.timeout_s=2", "resources.purify_batch_size=48", "blackbox.max_batch_size=4",
                     "blackbox.max_concurrency=1", "resources.query_actors=1")
    summary = run_sanitize(cfg)
    table = read_output(LOCAL, str(tmp_path / "out"))
    numbers = report(f"black box fails 20% of calls {dict(srv.counts)}", len(src.expected), table)
    assert_exactly_once(table, src.expected)
    assert summary.rows_total == summary.rows_this_run == len(src.expected) == table.num_rows
    rows = table.to_pylist()
    failed = [r for r in rows if r["error"] is not None]
    ok = [r for r in rows if r["error"] is None]
    # Rows whose query failed after the retry budget: an error row with the last failure and the tries spent.
    reason = re.compile(r"black box: (http 503|http 429|connection reset|timeout) after 2 tries")
    assert failed and all(reason.fullmatch(r["error"]) for r in failed), {r["error"] for r in failed}
    reasons = {r["error"] for r in failed}
    assert {"black box: http 503 after 2 tries", "black box: connection reset after 2 tries"} <= reasons
    assert all(r["pred_orig"] is None and r["pred_purified"] is None and r["image_png"] is None for r in failed)
    # Every other row has real answers, including those whose first try hit a 429 or a timeout.
    assert len(ok) > len(failed)
    assert all(0 <= r["pred_orig"] < 10 and 0 <= r["pred_purified"] < 10 and r["image_png"] for r in ok)
    assert summary.errors == numbers["errors"] == len(failed)
    # All four failure modes were served, and some queries needed a second try (requests > queries).
    assert all(srv.counts[m] >= 1 for m in ("503", "429", "reset", "slow")), srv.counts
    assert sum(srv.counts.values()) == srv.requests
    # A failed query spent 2 failed requests, a query saved by its retry 1 (the schedule has two of those); a
    # query carries at most 4 rows.
    failed_requests = srv.requests - srv.counts["ok"]
    assert failed_requests >= 2 * -(-len(failed) // 4) + 2
    assert all(r["retryable"] for r in failed)  # the endpoint's trouble, not the rows': the next run retries them


# ---------------------------------------------------------------------------------------------------------------
# 2. A purify actor process killed mid-job.


def _purify_actors() -> list[dict]:
    # The GCS actor table: ray.util.state.list_actors needs the dashboard, which the test cluster does not start.
    from ray._private import state as ray_state

    return [a for a in ray_state.actors().values()
            if "PurifyStage" in a["ActorClassName"] and a["State"] == "ALIVE" and a["Pid"]]


def test_purify_actor_killed_midjob_every_key_once(ray_local, tmp_path, flaky_v2_server):
    from ray._private import state as ray_state

    src = make_fmnist_shards(LOCAL, str(tmp_path / "src"), n_shards=3, per_shard=16, fmt="parquet")
    counter = flaky_v2_server(fail_rate=0.0)  # a healthy black box whose request count shows the job's progress
    # Blocks of at most 16 KiB: several blocks reach the purify actor one after another, so when the first
    # purified rows reach the black box the actor still has blocks to do.
    cfg = job_config(src.root, str(tmp_path / "out"), f"blackbox.uri={counter.url}",
                     "purify.params={t_start: 200, steps: 6}", "resources.purify_batch_size=8",
                     "resources.query_batch_size=8", "resources.decode_batch_size=8", "resources.max_block_kib=16")
    thread, result = run_in_thread(cfg)
    killed, queries_at_kill = None, 0
    deadline = time.time() + 300
    while thread.is_alive() and time.time() < deadline and killed is None:
        # Kill once the first purified batch has reached the black box: the actor is then mid-job with work left.
        if counter.requests >= 1:
            actors = _purify_actors()
            if actors:
                killed, queries_at_kill = actors[0], counter.requests
                os.kill(killed["Pid"], signal.SIGKILL)  # what the OOM killer or a lost node does
        time.sleep(0.05)
    thread.join(timeout=300)
    assert not thread.is_alive(), "the job hung after its purify actor was killed"
    assert "error" not in result, repr(result.get("error"))
    assert killed is not None, "the job finished before a purify actor could be killed"
    table = read_output(LOCAL, str(tmp_path / "out"))
    report(f"purify actor SIGKILLed after {queries_at_kill} of {counter.requests} queries", len(src.expected),
           table)
    assert_exactly_once(table, src.expected)
    assert table["error"].null_count == table.num_rows, table["error"].drop_null().to_pylist()[:3]
    # Ray restarted that same actor (max_restarts=-1) and retried its in-flight task (max_task_retries=-1).
    after = ray_state.actors(actor_id=killed["ActorID"])
    assert after["NumRestarts"] >= 1, after
    assert queries_at_kill < counter.requests, "no work was left when the actor was killed"


# ---------------------------------------------------------------------------------------------------------------
# 4. An S3 endpoint that is down, then back.


class OwnMotoServer:
    """A moto S3 server this test can stop and start again on the same port (moto keeps its buckets in the
    process, so what was written before the outage is there after it, as with a real store)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.host, self.port = self._server.get_host_and_port()
        self.s3 = S3Server(host=self.host, port=self.port)
        self.up = True

    def stop(self) -> None:
        if self.up:
            self._server.stop()
            self.up = False

    def start(self) -> None:
        if not self.up:
            self._server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._server.start()
            self.up = True


@pytest.fixture
def own_moto():
    server = OwnMotoServer()
    yield server
    server.stop()


def test_s3_down_fails_fast_with_a_clear_error_then_runs_when_back(ray_local, tmp_path, own_moto):
    bucket = own_moto.s3.make_bucket()
    src = make_fmnist_shards(own_moto.s3.filesystem(), f"{bucket}/in", n_shards=2, per_shard=6, fmt="parquet")
    local_src = make_fmnist_shards(LOCAL, str(tmp_path / "src"), n_shards=1, per_shard=4, fmt="parquet")
    endpoint = own_moto.s3.endpoint_url
    own_moto.stop()
    # Source on the dead endpoint; then a local source with the output on the dead endpoint.
    cases = {
        "source": job_config(src.uri, f"s3://{bucket}/out", endpoint=endpoint),
        "output": load_config(overrides=[f"source.uri={local_src.root}", f"output.uri=s3://{bucket}/out",
                                         f"output.endpoint_url={endpoint}", "purify.method=sdedit", *FAST]),
    }
    for what, cfg in cases.items():
        t0 = time.time()
        with pytest.raises(StorageError) as err:
            run_sanitize(cfg)
        elapsed = time.time() - t0
        msg = str(err.value)
        print(f"\n[reliability] S3 down ({what}): StorageError after {elapsed:.1f}s: {msg}")
        assert elapsed < 60, f"{elapsed:.0f}s to give up on a dead endpoint"
        assert "cannot reach the storage endpoint" in msg and f"127.0.0.1:{own_moto.port}" in msg, msg
        assert f"s3://{bucket}/" in msg and "testing" not in msg
    # The endpoint is back (same address, same data): the same config now runs to the end.
    own_moto.start()
    summary = run_sanitize(cases["source"])
    table = read_output(own_moto.s3.filesystem(), f"{bucket}/out")
    report("S3 down before the job, then back", len(src.expected), table)
    assert_exactly_once(table, src.expected)
    assert summary.rows_total == len(src.expected) and summary.errors == 0


@pytest.mark.parametrize("outage", ["short", "long"])
def test_s3_down_mid_write(ray_local, tmp_path, own_moto, outage):
    """The output store disappears once the first file has landed.

    ``short``: it is back 4 s later. Ray Data retries I/O that fails with a network error (up to 10 tries, ~2.5
    min of backoff), so the job rides it out and completes, every key once.
    ``long``: an outage that outlasts those retries, shortened for the test by emptying Ray's list of retried I/O
    errors (``DataContext.retried_io_errors``): the job must end (no hang) with one StorageError, and a rerun
    once the store is back must neither trust a file of the failed run nor redo a finished row (Ray Data's
    checkpoint commits a file's ids only after the file is written, and removes uncommitted files at the next
    start)."""
    from ray.data import DataContext

    bucket = own_moto.s3.make_bucket()
    src = make_fmnist_shards(LOCAL, str(tmp_path / "src"), n_shards=4, per_shard=10, fmt="parquet")
    # Blocks of at most 16 KiB: this small job then streams several blocks and writes several files, as a big one
    # does with the default block size.
    cfg = job_config(src.root, f"s3://{bucket}/out", "resources.purify_batch_size=8",
                     "resources.query_batch_size=8", "resources.decode_batch_size=8", "resources.max_block_kib=16",
                     f"output.endpoint_url={own_moto.s3.endpoint_url}")
    client = own_moto.s3.client()
    ctx = DataContext.get_current()
    saved_retried = list(ctx.retried_io_errors)
    if outage == "long":
        ctx.retried_io_errors = []
    try:
        thread, result = run_in_thread(cfg)
        deadline = time.time() + 300
        stopped_after = None
        while thread.is_alive() and time.time() < deadline:
            objs = client.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])
            written = [o["Key"] for o in objs if o["Key"].endswith(".parquet") and "/_" not in o["Key"]]
            if written:
                own_moto.stop()
                stopped_after = len(written)
                break
            time.sleep(0.1)
        assert stopped_after is not None, f"the job ended before the first file landed: {result}"
        t_stop = time.time()
        if outage == "short":
            time.sleep(4)
            own_moto.start()
        thread.join(timeout=240)
        hung = thread.is_alive()
        ended_after = time.time() - t_stop
        own_moto.start()
        if hung:  # report it, then let it finish against the live store so that the session's Ray stays usable
            thread.join(timeout=300)
    finally:
        ctx.retried_io_errors = saved_retried
    assert not hung, "the job hung while the output store was down"
    error = result.get("error")
    print(f"\n[reliability] S3 down mid-write ({outage}) after {stopped_after} file(s): the job ended "
          f"{ended_after:.0f}s later, {type(error).__name__ + ': ' + str(error) if error else 'completed'}")
    fs = own_moto.s3.filesystem()
    if outage == "short":
        assert error is None, f"{type(error).__name__}: {error}"
        table = read_output(fs, f"{bucket}/out")
        report("S3 down 4 s mid-write, then back", len(src.expected), table)
    else:
        assert isinstance(error, StorageError), f"{type(error).__name__}: {error}"
        assert f"s3://{bucket}/out" in str(error) and "rerun the same job" in str(error)
        assert ended_after < 120, f"{ended_after:.0f}s to give up"
        partial = read_output(fs, f"{bucket}/out").num_rows
        ckpt = fs.get_file_info(pafs.FileSelector(f"{bucket}/out/_ray_checkpoint", allow_not_found=True))
        committed = sum(pq.read_metadata(i.path, filesystem=fs).num_rows for i in ckpt
                        if i.path.endswith(".parquet") and not i.path.endswith(".pending.parquet"))
        summary = run_sanitize(cfg)
        table = read_output(fs, f"{bucket}/out")
        report(f"S3 down mid-write for good (first run left {partial} rows in files, {committed} ids committed), "
               "rerun", len(src.expected), table)
        assert summary.rows_total == len(src.expected)
    assert_exactly_once(table, src.expected)
    assert table["error"].null_count == table.num_rows
    # Every file the output holds is complete and readable (a reader would trust each of them).
    for frag in pads.dataset(f"{bucket}/out", filesystem=fs, format="parquet").get_fragments():
        assert frag.count_rows() > 0


def test_a_failed_run_waits_for_its_own_tasks(ray_local):
    """The fence a failed job passes before it raises: it returns once the tasks that were started after the
    baseline have given their CPUs back (a write that lands late can no longer race a rerun), and gives up, saying
    so, when they outlast the timeout."""
    import ray

    from pipeline.job import wait_for_tasks_to_end

    @ray.remote(num_cpus=1)
    def write_late(path: str, seconds: float) -> None:
        time.sleep(seconds)
        Path(path).write_text("late")

    def started(free: float) -> None:  # until the task holds its CPU
        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU", 0.0) >= free:
            assert time.monotonic() < deadline, "the task never started"
            time.sleep(0.05)

    with tempfile.TemporaryDirectory() as d:
        free = ray.available_resources().get("CPU", 0.0)
        ref = write_late.remote(f"{d}/a", 3.0)
        started(free)
        t0 = time.monotonic()
        assert wait_for_tasks_to_end(free, timeout_s=60)
        assert Path(f"{d}/a").read_text() == "late", "the fence returned before the task's write landed"
        assert time.monotonic() - t0 < 30
        ray.get(ref)
        slow = write_late.remote(f"{d}/b", 8.0)
        started(free)
        assert not wait_for_tasks_to_end(free, timeout_s=1.0)
        ray.get(slow)


# ---------------------------------------------------------------------------------------------------------------
# 5. Bad and odd inputs through the whole job.


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring a huge image, with almost no data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def test_bad_inputs_through_the_whole_job(ray_local, tmp_path):
    """One job over good Fashion-MNIST shards plus a shard of hostile and odd images, from a Parquet source with no
    label column. Defined outcomes (output.keep_original=true shows what each input was converted to):

    - zero-byte, truncated PNG, truncated JPEG, non-image bytes, a PNG declaring 100000x100000 pixels: an error
      row with the decoder's reason, every result column null;
    - 16-bit PNG (scaled to 8 bits, not clipped), CMYK JPEG, palette PNG, a 40x36 RGB image (converted to grey and
      resized to 28x28, policy ``resize``): converted and purified like any other image;
    - a key present in two shards: BOTH rows are kept, and both are error rows ``duplicate key ...`` (a key that
      names two images cannot tie a result to one of them, and resume, which is keyed on it, could not tell them
      apart); all other keys are unaffected;
    - no label column: every row's label is null.
    """
    root = tmp_path / "src"
    good = make_fmnist_shards(LOCAL, str(root), n_shards=2, per_shard=6, fmt="parquet", with_labels=False)
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8), "RGB")
    jpeg = _save(noise, "JPEG", quality=90)
    ok_png = encode_png(next(iter(good.images.values()))[None, None])[0]
    sixteen = np.linspace(0, 65535, 28 * 28).round().astype(np.uint16).reshape(28, 28)
    grey_levels = np.array([0, 40, 90, 150, 210, 255], np.uint8)
    index = rng.integers(0, len(grey_levels), (28, 28)).astype(np.uint8)
    palette = Image.fromarray(index, "P")
    palette.putpalette([int(v) for g in grey_levels for v in (g, g, g)])
    cmyk = Image.new("CMYK", (28, 28), (0, 0, 0, 100))  # 100/255 black ink: a mid grey
    rgb = (200, 120, 40)
    inputs = {
        "zero-byte": b"",
        "truncated-png": ok_png[: len(ok_png) // 2],
        "truncated-jpeg": jpeg[: len(jpeg) // 2],
        "not-an-image": b"<html>definitely not an image</html>" * 4,
        "bomb-png": _bomb_png(100_000, 100_000),
        "png-16bit": _save(Image.fromarray(sixteen), "PNG"),
        "jpeg-cmyk": _save(cmyk, "JPEG", quality=95),
        "png-palette": _save(palette, "PNG"),
        "rgb-40x36": _save(Image.new("RGB", (36, 40), rgb), "PNG"),
        "dup-key": ok_png,
    }
    expected_errors = {"zero-byte": "empty image", "truncated-png": "truncated or corrupt image",
                       "truncated-jpeg": "truncated or corrupt image", "not-an-image": "not an image",
                       "bomb-png": "image too large"}
    pq.write_table(pa.table({"key": list(inputs), "image": pa.array(list(inputs.values()), pa.binary())}),
                   root / "shard-odd.parquet")
    pq.write_table(pa.table({"key": ["dup-key", "unique-key"], "image": pa.array([ok_png, ok_png], pa.binary())}),
                   root / "shard-zzz.parquet")
    rows_in = len(good.expected) + len(inputs) + 2
    cfg = job_config(str(root), str(tmp_path / "out"), "output.keep_original=true")
    summary = run_sanitize(cfg)
    table = read_output(LOCAL, str(tmp_path / "out"))
    report("bad inputs (10 kinds) + a key in two shards", rows_in, table)
    assert table.num_rows == summary.rows_total == rows_in
    counts = Counter(table["key"].to_pylist())
    assert counts == Counter({**{k: 1 for k in good.expected}, **{k: 1 for k in inputs}, "dup-key": 2,
                              "unique-key": 1})
    assert table["label"].null_count == table.num_rows  # no label column in the source
    rows = table.to_pylist()
    by_key = {r["key"]: r for r in rows}
    for key, reason in expected_errors.items():
        r = by_key[key]
        assert r["error"] and r["error"].startswith(reason), (key, r["error"])
        assert r["image_png"] is None and r["image_orig_png"] is None and r["pred_purified"] is None, key
    dup_rows = [r for r in rows if r["key"] == "dup-key"]
    assert {r["shard"].rsplit("/", 1)[-1] for r in dup_rows} == {"shard-odd.parquet", "shard-zzz.parquet"}
    assert all(r["error"] == "duplicate key (2 rows of the source have this key)" for r in dup_rows), dup_rows
    assert all(r["image_png"] is None and r["pred_orig"] is None for r in dup_rows)
    converted = [k for k in inputs if k not in expected_errors and k != "dup-key"]
    for key in [*converted, *good.expected, "unique-key"]:
        r = by_key[key]
        assert r["error"] is None, (key, r["error"])
        assert decode_png(r["image_png"]).shape == (1, 28, 28) and 0 <= r["pred_purified"] < 10, key
    orig = {k: decode_png(by_key[k]["image_orig_png"])[0] for k in converted}
    assert np.array_equal(orig["png-16bit"], ((sixteen.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8))
    assert np.array_equal(orig["png-palette"], grey_levels[index])
    assert abs(float(orig["jpeg-cmyk"].mean()) - (255 - 100)) <= 3
    assert np.abs(orig["rgb-40x36"].astype(int) - round((299 * rgb[0] + 587 * rgb[1] + 114 * rgb[2]) / 1000)).max() <= 1
    assert summary.errors == len(expected_errors) + 2

    # A run cut short between the two rows of a repeated key: one is written, the other not, yet Ray's checkpoint
    # holds the key, so it would skip the missing row forever. Made here by taking that row out of the output.
    out = tmp_path / "out"
    for path in sorted(out.glob("*.parquet")):
        part = pq.read_table(path)
        cut = pc.and_(pc.equal(part["key"], "dup-key"), pc.ends_with(part["shard"], "shard-zzz.parquet"))
        if pc.any(cut).as_py():
            pq.write_table(part.filter(pc.invert(cut)), path)
    assert Counter(read_output(LOCAL, str(out))["key"].to_pylist())["dup-key"] == 1
    resumed = run_sanitize(cfg)
    table = read_output(LOCAL, str(out))
    assert resumed.retried == 1 and resumed.rows_this_run == 2 and table.num_rows == rows_in
    dup_rows = [r for r in table.to_pylist() if r["key"] == "dup-key"]
    assert {r["shard"].rsplit("/", 1)[-1] for r in dup_rows} == {"shard-odd.parquet", "shard-zzz.parquet"}
    assert all(r["error"] == "duplicate key (2 rows of the source have this key)" for r in dup_rows), dup_rows

    # A shard added later repeats a key the first run finished: the new row is not skipped as done, the finished row
    # is taken back, and both become duplicate-key error rows; the rows already done stay as they were.
    later = root / "shard-later.parquet"
    pq.write_table(pa.table({"key": ["unique-key"], "image": pa.array([ok_png], pa.binary())}), later)
    again = run_sanitize(cfg)
    table = read_output(LOCAL, str(tmp_path / "out"))
    assert table.num_rows == again.rows_total == rows_in + 1 and again.retried == 1
    rows = table.to_pylist()
    twice = [r for r in rows if r["key"] == "unique-key"]
    assert {r["shard"].rsplit("/", 1)[-1] for r in twice} == {"shard-zzz.parquet", "shard-later.parquet"}
    assert all(r["error"] == "duplicate key (2 rows of the source have this key)" for r in twice), twice
    assert {r["key"]: r["pred_purified"] for r in rows if r["key"] != "unique-key"} == \
        {k: r["pred_purified"] for k, r in by_key.items() if k != "unique-key"}
    # Once the key no longer repeats, its row gets a result; the key still in two shards stays as it was.
    later.unlink()
    fixed = run_sanitize(cfg)
    table = read_output(LOCAL, str(tmp_path / "out"))
    assert table.num_rows == fixed.rows_total == rows_in and fixed.retried == 2 and fixed.rows_this_run == 1
    now = [r for r in table.to_pylist() if r["key"] == "unique-key"]
    assert len(now) == 1 and now[0]["error"] is None and 0 <= now[0]["pred_purified"] < 10
    assert Counter(table["key"].to_pylist())["dup-key"] == 2


def cheap_stage(service):
    """A CPU purify actor's stage, built in this process, with a two-step SDEdit on the embedded model."""
    from pipeline.stages import PurifyStage

    return PurifyStage(model="fmnist-tiny", device="cpu", dtype="float32", method="sdedit",
                       params={"t_start": 100, "steps": 2}, seed=0, service=service.names,
                       namespace=service.namespace, torch_threads=1)


def test_a_purify_failure_is_retried_not_frozen(ray_local):
    """A batch the purifier refuses fails for the whole batch alike (decode already turned each row's own bad data
    into an error row): a rerun after the fix must retry those rows, not skip them as done."""
    import asyncio

    from pipeline.job import start_blackbox

    cfg = load_config(None, [])
    service = start_blackbox(cfg)
    try:
        stage = cheap_stage(service)
        batch = {"key": np.array(["a", "b", "c"], object), "label": np.array([1, 2, 3]),
                 "error": np.array([None, None, "not an image"], object),
                 "image": np.zeros((3, 3, 32, 32), np.uint8)}  # not the model's 1x28x28
        out = asyncio.run(stage(batch))
    finally:
        service.close()
    assert [e.startswith("purify: ") for e in out["error"][:2]] == [True, True], out["error"]
    assert out["retryable"].tolist() == [True, True, False]  # the decode error stays the row's own
    assert out["error"][2] == "not an image"


def test_a_purifier_started_after_the_budget_ledger_is_lost_leaves_its_rows_to_the_next_run(ray_local):
    """With a query budget, the service actor keeping its ledger is never restarted (a restart would forget what was
    spent). A purify actor started after it is gone (the pool growing, an actor restarted) must still start, and
    leave its rows to the next run instead of failing the job."""
    import asyncio

    import ray

    from pipeline.job import start_blackbox

    service = start_blackbox(load_config(None, ["blackbox.query_budget=100", "resources.query_actors=2"]))
    try:
        ray.kill(service.actors[0], no_restart=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                ray.get_actor(service.names[0], namespace=service.namespace)
            except ValueError:
                break
            time.sleep(0.2)
        stage = cheap_stage(service)
        out = asyncio.run(stage({"key": np.array(["a", "b"], object), "label": np.array([1, 2]),
                                 "error": np.array([None, None], object),
                                 "image": np.zeros((2, 1, 28, 28), np.uint8)}))
    finally:
        service.close()
    assert out["error"].tolist() == ["black box: service unavailable (ServiceLost)"] * 2
    assert out["retryable"].tolist() == [True, True]


def test_a_model_out_of_memory_fails_its_batch_not_the_job(ray_local):
    """torch's own failures (out of memory on a GPU another process filled) fail the batch's rows, retried by the
    next run, and the purifier goes on with the next batch."""
    import asyncio

    import torch

    from pipeline.job import start_blackbox

    cfg = load_config(None, [])
    service = start_blackbox(cfg)
    try:
        stage = cheap_stage(service)
        unet_forward = stage.model.unet.forward
        full = {"on": True}

        def forward(*args, **kwargs):
            if full["on"]:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
            return unet_forward(*args, **kwargs)

        stage.model.unet.forward = forward
        batch = {"key": np.array(["a", "b"], object), "label": np.array([1, 2]),
                 "error": np.array([None, None], object), "image": np.zeros((2, 1, 28, 28), np.uint8)}
        failed = asyncio.run(stage(dict(batch)))
        full["on"] = False
        after = asyncio.run(stage(dict(batch)))
    finally:
        service.close()
    assert failed["error"].tolist() == ["purify: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"] * 2
    assert failed["retryable"].tolist() == [True, True]
    assert after["error"].tolist() == [None, None] and (after["pred_purified"] >= 0).all()


def test_a_released_key_takes_every_row_that_carries_it(tmp_path):
    """Resume state as earlier runs leave it: whenever a key leaves the checkpoint, every output row with it goes
    too, or the rerun, which reads every row of the key again, would write a second copy of those left behind."""
    from pipeline.requeue import release_retryable
    from pipeline.sources import mark_duplicate_keys

    dup = "duplicate key (2 rows of the source have this key)"

    def state(rows: list[tuple[str, str | None]]) -> tuple[str, str]:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        ckpt = out / "_ray_checkpoint"
        ckpt.mkdir()
        pq.write_table(pa.table({"key": [k for k, _ in rows], "error": pa.array([e for _, e in rows], pa.string()),
                                 "retryable": [False] * len(rows)}), out / "part-0.parquet")
        pq.write_table(pa.table({"key": sorted({k for k, _ in rows})}), ckpt / "ids.parquet")
        return str(out), str(ckpt)

    def after(out: str, ckpt: str) -> tuple[list[str], list[str]]:
        return (sorted(pq.read_table(f"{out}/part-0.parquet")["key"].to_pylist()),
                sorted(pq.read_table(f"{ckpt}/ids.parquet")["key"].to_pylist()))

    # x repeats; an older run let a read error win over the key's verdict on one of its rows
    out, ckpt = state([("x", "image too large (99 bytes > 10)"), ("x", dup), ("y", None)])
    assert release_retryable(LOCAL, out, ckpt, "key", {"x": 2}).rows == 2
    assert after(out, ckpt) == (["y"], ["y"])
    # x no longer repeats: the duplicate-key row is released, and with it the other row of x
    out, ckpt = state([("x", "image too large (99 bytes > 10)"), ("x", dup), ("y", None)])
    assert release_retryable(LOCAL, out, ckpt, "key", {}).rows == 2
    assert after(out, ckpt) == (["y"], ["y"])
    # a run cut short between the two rows of x: one written, the key checkpointed
    out, ckpt = state([("x", dup), ("y", None)])
    assert release_retryable(LOCAL, out, ckpt, "key", {"x": 2}).rows == 1
    assert after(out, ckpt) == (["y"], ["y"])
    # both rows written, same verdict: nothing to do
    out, ckpt = state([("x", dup), ("x", dup), ("y", None)])
    assert release_retryable(LOCAL, out, ckpt, "key", {"x": 2}).rows == 0
    assert after(out, ckpt) == (["x", "x", "y"], ["x", "y"])
    # ... unless one of them is in a file whose checkpoint is still pending (a run cut short inside Ray's two-phase
    # commit): Ray deletes that file before the rerun, so only one row of x is really written
    out, ckpt = state([("x", dup), ("y", None)])
    pq.write_table(pa.table({"key": ["x"], "error": pa.array([dup], pa.string()), "retryable": [False]}),
                   f"{out}/w7_000001_000000.parquet")
    pq.write_table(pa.table({"key": ["x"]}), f"{ckpt}/w7_000001.pending.parquet")
    assert release_retryable(LOCAL, out, ckpt, "key", {"x": 2}).rows == 1
    assert after(out, ckpt) == (["y"], ["y"])

    # And the job's own marking keeps the key's verdict on every row of it, whatever the read found.
    block = pa.table({"key": ["x", "x", "y"], "error": pa.array(["image too large (99 bytes > 10)", None, None])})
    marked = mark_duplicate_keys(block, {"x": 2})["error"].to_pylist()
    assert marked == [dup, dup, None]


def test_a_black_box_down_while_the_gate_is_measured_stops_the_job_before_any_row(ray_local, tmp_path,
                                                                                 flaky_v2_server):
    """A gate measured on no answer would stay shut for the whole run, and the rows decided under it would never
    be redone: the job stops before the plan, and a rerun measures the gate and purifies every row."""
    from tests.test_pipeline_e2e import CASCADE

    srv = flaky_v2_server(fail_rate=0.0, schedule=["ok"] + ["503"] * 5)  # the probe, then the gate's request
    src = make_fmnist_shards(LOCAL, str(tmp_path / "src"), n_shards=1, per_shard=8, fmt="parquet")
    out = tmp_path / "out"
    args = [f"source.uri={src.root}", f"output.uri={out}", f"blackbox.uri={srv.url}", CASCADE,
            "blackbox.retries=4", *FAST[1:]]
    with pytest.raises(BlackBoxUnavailable, match="answered none of the 8 images the vote's gate"):
        run_sanitize(load_config(overrides=args))
    assert not out.exists() or not any(out.glob("*.parquet"))
    summary = run_sanitize(load_config(overrides=args))
    assert summary.rows_this_run == 8 and summary.errors == 0 and summary.gate and summary.gate > 0


def test_rows_left_to_retry_stay_in_the_output_when_the_next_run_stops_on_the_outage(ray_local, tmp_path,
                                                                                     flaky_v2_server):
    """The rows an outage left to retry leave the output only once the next run has its black box answering: a
    run that stops on the outage before any work (here: no answer for the gate) leaves them where they show."""
    from tests.test_pipeline_e2e import CASCADE

    # Run 1: the probe and one of the gate's two requests answered (a gate measured, not saved), then an outage.
    srv = flaky_v2_server(fail_rate=0.0, schedule=["ok", "ok"] + ["503"] * 400)
    src = make_fmnist_shards(LOCAL, str(tmp_path / "src"), n_shards=1, per_shard=8, fmt="parquet")
    out = tmp_path / "out"
    args = [f"source.uri={src.root}", f"output.uri={out}", f"blackbox.uri={srv.url}", CASCADE,
            "blackbox.retries=0", "blackbox.max_batch_size=4", *FAST[1:]]
    first = run_sanitize(load_config(overrides=args))
    assert first.rows_this_run == 8 and first.retryable == 8
    # Run 2: the probe passes, the gate gets no answer: the job stops, and the 8 rows are still there to see.
    srv.schedule = ["ok"] * srv.requests + ["ok", "503", "503"]
    with pytest.raises(BlackBoxUnavailable, match="answered none of the 8 images the vote's gate"):
        run_sanitize(load_config(overrides=args))
    left = read_output(LOCAL, str(out))
    assert left.num_rows == 8 and left["retryable"].to_pylist() == [True] * 8
    # Run 3: the black box is back; every row is done, once.
    srv.schedule = []
    third = run_sanitize(load_config(overrides=args))
    assert third.retried == 8 and third.errors == 0 and third.rows_total == 8
    assert_exactly_once(read_output(LOCAL, str(out)), src.expected)


def test_a_write_cut_short_inside_the_commit_is_redone_and_counted_as_this_runs(ray_local, tmp_path):
    """A data file whose checkpoint is still pending (a run cut short inside Ray's two-phase commit) is deleted by
    Ray when the next run starts, and its rows written again: they are that run's rows, in the summary too."""
    src = make_fmnist_shards(LOCAL, str(tmp_path / "src"), n_shards=2, per_shard=10, fmt="parquet")
    out = tmp_path / "out"
    first = run_sanitize(job_config(src.root, str(out), "source.limit=10"))
    assert first.rows_this_run == 10
    committed = sorted((out / "_ray_checkpoint").glob("*.parquet"))[-1]
    lost = sum(pq.read_metadata(p).num_rows for p in out.glob(committed.stem + "*.parquet"))
    assert lost > 0
    committed.rename(committed.with_name(committed.stem + ".pending.parquet"))
    second = run_sanitize(job_config(src.root, str(out)))
    table = read_output(LOCAL, str(out))
    assert_exactly_once(table, src.expected)
    assert second.rows_total == 20 and second.rows_this_run == 20 - (10 - lost)


# ---------------------------------------------------------------------------------------------------------------
# 6. Untrusted artefacts and secrets.


class _Payload:
    """Pickles as a call to os.mkdir(marker): proof of code execution if anything ever unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_model_folder_with_only_pickled_weights_is_refused(tmp_path):
    import torch

    from pipeline.purify.models import load_model

    model = tmp_path / "evil-model"
    (model / "unet").mkdir(parents=True)
    shutil.copy(REPO / "models/fmnist-ddpm/unet/config.json", model / "unet/config.json")
    shutil.copytree(REPO / "models/fmnist-ddpm/scheduler", model / "scheduler")
    marker = tmp_path / "pwned"
    torch.save({"conv_in.weight": _Payload(marker)}, model / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors") as err:
        load_model(str(model), "cpu")
    print(f"\n[reliability] pickle-only model folder: {type(err.value).__name__}: {str(err.value)[:200]}")
    assert str(model) in str(err.value) and "diffusion_pytorch_model.bin" in str(err.value)
    assert not marker.exists(), "the pickled weights were unpickled"


def png_folder(tmp_path: Path) -> Path:
    """Four flat 28x28 gray PNGs: a training set for jobs/train_diffusion.py that costs nothing."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8), "L").save(data / f"{i}.png")
    return data


def test_training_checkpoint_with_malicious_pickle_is_refused(tmp_path):
    import torch

    data = png_folder(tmp_path)
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"unet": {}, "step": _Payload(marker)}, ckpt_dir / "last.pt")
    out = tmp_path / "exported"
    proc = subprocess.run(
        [sys.executable, "jobs/train_diffusion.py", "--data", str(data), "--out", str(out), "--ckpt-dir",
         str(ckpt_dir), "--steps", "2", "--device", "cpu", "--threads", "1", "--width", "8"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    print(f"\n[reliability] malicious training checkpoint: exit {proc.returncode}, "
          f"{proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else ''}")
    assert proc.returncode != 0
    assert "Weights only load failed" in proc.stderr or "UnpicklingError" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists(), "the checkpoint's pickle ran code"
    assert not out.exists(), "a refused checkpoint must not lead to an export"
    # And every torch.load in the project says weights_only=True (the test above proves the one that runs).
    for path in [*REPO.glob("pipeline/**/*.py"), *REPO.glob("jobs/*.py")]:
        for line in path.read_text().splitlines():
            if "torch.load(" in line and not line.lstrip().startswith("#"):
                assert "weights_only=True" in line, f"{path.relative_to(REPO)}: {line.strip()}"


def test_diffusion_training_anneals_over_its_time_budget(tmp_path):
    """On a device of unknown speed (`--anneal-by-time`), the LR's cosine runs over the time budget, so the run ends
    annealed and exported whatever number of steps it reached; without a budget the flag is refused."""
    import torch

    from pipeline.purify.models import load_model

    data = png_folder(tmp_path)
    out, ckpt_dir = tmp_path / "exported", tmp_path / "ckpt"
    cmd = [sys.executable, "jobs/train_diffusion.py", "--data", str(data), "--out", str(out), "--ckpt-dir",
           str(ckpt_dir), "--steps", "1000000", "--batch", "8", "--lr", "1e-3", "--device", "cpu", "--threads", "1",
           "--width", "8", "--ckpt-every", "1000000", "--anneal-by-time"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    refused = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode == 2 and "--anneal-by-time needs --time-budget" in refused.stderr
    proc = subprocess.run([*cmd, "--time-budget", "4"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "training.json").read_text())
    state = torch.load(ckpt_dir / "last.pt", weights_only=True)
    last_lr = state["lr"]["_last_lr"][0]
    print(f"\n[training] anneal by time: {meta['steps']} steps in {meta['train_seconds']} s, last LR {last_lr:.2e}")
    assert meta["steps"] >= 2 and meta["steps"] == state["step"]
    warmed = 1e-3 * min(1.0, meta["steps"] / 200)  # the LR the warm-up alone would give at the last step
    assert last_lr < 0.1 * warmed, "the LR must be annealed by the end of the budget"
    assert "--anneal-by-time --" in meta["command"] and "True" not in meta["command"]
    model = load_model(str(out), "cpu")
    assert sum(p.numel() for p in model.unet.parameters()) == meta["parameters"]


def test_yaml_config_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "job.yaml"
    evil.write_text(f"source:\n  uri: !!python/object/apply:os.mkdir ['{marker}']\n")
    with pytest.raises(ValueError, match="not valid YAML .*python/object/apply"):
        load_config(evil)
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(overrides=[f"source.uri=!!python/object/apply:os.mkdir ['{marker}']"])
    evil.write_text(f"!!python/object/new:os.system [touch {marker}]\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(evil)
    assert not marker.exists()


def test_credentials_never_leak_from_a_job(s3_server, flaky_v2_server, tmp_path, caplog, capfd):
    """A job (its own driver process and local Ray) reads and writes S3 with an AWS secret, queries a black box
    with a bearer token (blackbox.auth_env) and an API key (blackbox.header_env). The key passes preflight's probe,
    then is revoked: the server rejects it and, carelessly, echoes it back. None of the three values may show up in
    the driver's output, the Ray logs, the output Parquet (every string column) or its error rows, and the refused
    rows are retryable (a later run with a good key redoes them)."""
    aws_secret = f"aws-secret-{uuid.uuid4().hex}"
    token = f"bearer-token-{uuid.uuid4().hex}"
    api_key = f"api-key-{uuid.uuid4().hex}"
    secrets = (aws_secret, token, api_key)
    srv = flaky_v2_server(fail_rate=0.0, echo_headers=True,
                          require_headers={"Authorization": f"Bearer {token}", "X-Api-Key": api_key})

    def revoke_after_probe() -> None:
        deadline = time.monotonic() + 300
        while srv.requests < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        srv.require_headers = {"Authorization": f"Bearer {token}", "X-Api-Key": "another-key"}

    threading.Thread(target=revoke_after_probe, daemon=True).start()
    bucket = s3_server.make_bucket()
    fs = s3_server.filesystem()
    src = make_fmnist_shards(fs, f"{bucket}/in", n_shards=1, per_shard=8, fmt="parquet")
    overrides = [f"source.uri=s3://{bucket}/in", f"output.uri=s3://{bucket}/out",
                 f"source.endpoint_url={s3_server.endpoint_url}", f"output.endpoint_url={s3_server.endpoint_url}",
                 f"blackbox.uri={srv.url}", "blackbox.auth_env=BB_TOKEN", "blackbox.header_env={X-Api-Key: BB_KEY}",
                 "purify.method=sdedit", *FAST]
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": aws_secret, "BB_TOKEN": token, "BB_KEY": api_key,
           "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline", "sanitize", *overrides], cwd=REPO,
                              env={**env, "RAY_TMPDIR": ray_tmp}, capture_output=True, text=True, timeout=600)
        ray_logs = [p.read_text(errors="replace") for p in Path(ray_tmp).rglob("*")
                    if p.is_file() and p.suffix in (".log", ".out", ".err", ".txt", ".json")]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 75, proc.stderr[-3000:]  # every row retryable: the output is not complete
    assert "retryable" in proc.stdout
    assert srv.headers_seen.get("Authorization") == f"Bearer {token}", "the token was not sent"
    assert srv.headers_seen.get("X-Api-Key") == api_key, "the API key was not sent"
    table = read_output(fs, f"{bucket}/out")
    assert_exactly_once(table, src.expected)
    errors = table["error"].to_pylist()
    assert all(e and e.startswith("black box: http 401") and "X-Api-Key=***" in e for e in errors), errors[:2]
    assert all(table["retryable"].to_pylist())
    strings = [v for name in table.column_names if pa.types.is_string(table.schema.field(name).type)
               for v in table[name].to_pylist() if v]
    # The driver-side code paths once more in this process, where caplog sees every record (DEBUG included).
    import logging

    from pipeline.job import preflight

    caplog.set_level(logging.DEBUG)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BB_TOKEN", token)
        mp.setenv("BB_KEY", api_key)
        mp.setenv("AWS_SECRET_ACCESS_KEY", aws_secret)
        with pytest.raises(BlackBoxUnavailable, match=r"refused the credentials in \$BB_TOKEN, \$BB_KEY") as refused:
            preflight(load_config(overrides=overrides))  # the key is revoked by now: the probe says so
    assert not any(secret in str(refused.value) for secret in secrets)
    captured = capfd.readouterr()
    texts = {"driver stdout": proc.stdout, "driver stderr": proc.stderr, "ray logs": "\n".join(ray_logs),
             "output strings": "\n".join(strings), "caplog": caplog.text, "captured": captured.out + captured.err}
    assert len(texts["ray logs"]) > 0 and len(texts["output strings"]) > 0
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"a secret leaked into the {where}"
    report("black box rejects the API key (401, echoing it); AWS secret + token in use", len(src.expected), table)
