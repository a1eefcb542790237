"""The sanitize job end to end on real components: local Ray, moto's S3 server and a v2 inference server on
127.0.0.1, the committed diffusion model, and the committed ONNX victim."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from pipeline.config import load_config
from pipeline.decode import decode_png
from pipeline.job import run_sanitize
from pipeline.sink import output_schema
from pipeline.storage import StorageError
from tests.plugins.s3 import make_fmnist_shards

REPO = Path(__file__).resolve().parents[1]
FAST = ["purify.params={t_start: 100, steps: 2}", "resources.purify_batch_size=16",
        "resources.query_batch_size=32", "resources.decode_batch_size=32"]
CASCADE = ("purify.params={base: guided, t_start: 100, steps: 2, locate_steps: 1, guide_steps: 1, k: 2, "
           "escalate: always}")  # the default's base, made cheap


def read_output(fs: pafs.FileSystem, path: str):
    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


def assert_exactly_once(table, expected: dict[str, int]) -> None:
    keys = table["key"].to_pylist()
    assert len(keys) == len(set(keys)), "duplicate keys in the output"
    assert set(keys) == set(expected), f"missing {set(expected) - set(keys)}, extra {set(keys) - set(expected)}"


@pytest.mark.parametrize("fmt,method", [("parquet", "cascade"), ("webdataset", "sdedit")])
def test_sanitize_from_s3_through_v2_back_to_s3(ray_local, s3_server, v2_server, fmt, method):
    bucket = s3_server.make_bucket()
    fs = s3_server.filesystem()
    shards = make_fmnist_shards(fs, f"{bucket}/in", n_shards=2, per_shard=20, fmt=fmt)
    cfg = load_config(overrides=[
        f"source.uri=s3://{bucket}/in", f"source.format={fmt}", f"source.endpoint_url={s3_server.endpoint_url}",
        f"output.uri=s3://{bucket}/out", f"output.endpoint_url={s3_server.endpoint_url}",
        f"blackbox.uri={v2_server.url}", f"purify.method={method}",
        *FAST, *([CASCADE] if method == "cascade" else []),
    ])
    summary = run_sanitize(cfg)
    table = read_output(fs, f"{bucket}/out")
    assert_exactly_once(table, shards.expected)
    assert summary.rows_total == summary.rows_this_run == len(shards.expected)
    want = output_schema(False)
    for f in want:
        assert table.schema.field(f.name).type == f.type, f.name
    assert table["error"].null_count == table.num_rows, table["error"].drop_null().to_pylist()[:3]
    rows = table.to_pylist()
    assert all(r["method"] == method for r in rows)
    if method == "cascade":
        # 3 NFE a pass, k 2, escalate always: both passes on every row, except where the black box was unsure of
        # the original label (below the gate measured on the first rows: its 2 ballots count) and the first pass
        # agreed: decided after one pass.
        assert 0 < summary.gate < 1
        for r in rows:
            assert r["nfe"] in (3, 6), r
            if r["nfe"] == 3:
                assert r["score_orig"] < summary.gate and r["pred_purified"] == r["pred_orig"], r
            if r["score_orig"] >= summary.gate:
                assert r["nfe"] == 6, r
        assert sum(r["nfe"] == 3 for r in rows) >= 3  # the gate opened through the pipeline's stages too
    else:
        assert all(r["nfe"] == 2 for r in rows)
    assert all(r["label"] == shards.expected[r["key"]] for r in rows)
    assert all(0 <= r["pred_orig"] < 10 and 0 <= r["pred_purified"] < 10 for r in rows)
    assert all(r["flagged"] == (r["pred_orig"] != r["pred_purified"]) for r in rows)
    img = decode_png(rows[0]["image_png"])
    assert img.shape == (1, 28, 28) and img.dtype == np.uint8
    # The purified image is close to, but not the same as, the input (t_start=100 is mild noise).
    orig = shards.images[rows[0]["key"]].astype(float)
    diff = np.abs(img[0].astype(float) - orig).mean()
    assert 0 < diff < 40
    # The undefended model is mostly right on clean Fashion-MNIST, and so is the defended one.
    labels = np.array([r["label"] for r in rows])
    assert (np.array([r["pred_orig"] for r in rows]) == labels).mean() > 0.7
    assert (np.array([r["pred_purified"] for r in rows]) == labels).mean() > 0.6


def test_bad_inputs_become_error_rows(ray_local, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = make_fmnist_shards(pafs.LocalFileSystem(), str(tmp_path / "src"), n_shards=1, per_shard=6,
                              fmt="parquet")
    png = next(iter(good.images.values()))
    from pipeline.decode import encode_png

    ok = encode_png(png[None, None])[0]
    bad = {"zero-byte": b"", "truncated": ok[: len(ok) // 2], "not-an-image": b"hello world" * 10,
           "ok-extra": ok}
    pq.write_table(pa.table({"key": list(bad), "image": list(bad.values()), "label": [1] * len(bad)}),
                   tmp_path / "src" / "shard-bad.parquet")
    cfg = load_config(overrides=[f"source.uri={tmp_path / 'src'}", f"output.uri={tmp_path / 'out'}",
                                 "purify.method=sdedit", *FAST])
    run_sanitize(cfg)
    table = read_output(pafs.LocalFileSystem(), str(tmp_path / "out"))
    assert_exactly_once(table, {**good.expected, **{k: 1 for k in bad}})
    errors = dict(zip(table["key"].to_pylist(), table["error"].to_pylist()))
    assert errors["zero-byte"] and errors["truncated"] and errors["not-an-image"]
    assert errors["ok-extra"] is None and all(errors[k] is None for k in good.expected)
    by_key = {r["key"]: r for r in table.to_pylist()}
    assert by_key["truncated"]["image_png"] is None and by_key["truncated"]["pred_purified"] is None


def test_a_stray_file_in_the_output_fails_the_job_up_front_naming_it(ray_local, tmp_path):
    """Resume reads every output *.parquet file before the job starts; one that is not Parquet (a half-copied file)
    stops the job there with a message naming it, and leaves no resume state behind for the next Ray Data job.
    Files with other names (a note) are not the job's: ignored."""
    from ray.data import DataContext

    src = make_fmnist_shards(pafs.LocalFileSystem(), str(tmp_path / "src"), n_shards=1, per_shard=4, fmt="parquet")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.parquet").write_bytes(b"not a parquet file")
    cfg = load_config(overrides=[f"source.uri={src.root}", f"output.uri={tmp_path / 'out'}", "purify.method=sdedit",
                                 *FAST])
    with pytest.raises(StorageError, match=r"notes\.parquet is not a readable Parquet file"):
        run_sanitize(cfg)
    assert DataContext.get_current().checkpoint_config is None
    assert not any(p.suffix == ".parquet" and p.name != "notes.parquet" for p in (tmp_path / "out").rglob("*"))
    # What is not named *.parquet is not one of the job's files: left alone, and no reason to fail.
    (tmp_path / "out" / "notes.parquet").rename(tmp_path / "out" / "notes.txt")
    summary = run_sanitize(cfg)
    assert summary.rows_total == summary.rows_this_run == 4 and summary.errors == 0
    assert (tmp_path / "out" / "notes.txt").read_bytes() == b"not a parquet file"


def test_a_black_box_trained_through_the_defense_fails_the_job(ray_local, tmp_path, capsys):
    """The committed defense-aware victim answers the look of the default vote's passes with its target: on clean
    images, the default job moves rows of most classes into class 0, and says that its labels are void (exit 3,
    the sink in the summary). The demo's ordinary BadNets victim, on the same images, passes the check."""
    from pipeline.cli import EXIT_ALERT, main

    src = make_fmnist_shards(pafs.LocalFileSystem(), str(tmp_path / "src"), n_shards=2, per_shard=150,
                             fmt="parquet")
    common = [f"source.uri={src.root}", "resources.torch_threads=1"]
    rc = main(["sanitize", *common, f"output.uri={tmp_path / 'adaptive'}",
               "blackbox.uri=onnx:models/zoo-adaptive/resnet-adaptive.onnx"])
    line = capsys.readouterr().out
    assert rc == EXIT_ALERT, line
    assert "SINK: class 0 absorbs" in line
    table = read_output(pafs.LocalFileSystem(), str(tmp_path / "adaptive"))
    assert_exactly_once(table, src.expected)  # the output is written in full: the verdict is on its labels
    rc = main(["sanitize", *common, f"output.uri={tmp_path / 'ordinary'}"])
    line = capsys.readouterr().out
    assert rc == 0 and "SINK" not in line, line


def test_fails_fast_on_wrong_bucket_and_dead_black_box(s3_server, tmp_path):
    src = make_fmnist_shards(pafs.LocalFileSystem(), str(tmp_path / "src"), n_shards=1, per_shard=4,
                             fmt="parquet")
    t0 = time.time()
    with pytest.raises(StorageError, match="no-such-bucket"):
        run_sanitize(load_config(overrides=[
            "source.uri=s3://no-such-bucket/in", f"source.endpoint_url={s3_server.endpoint_url}"]))
    from pipeline.blackbox.base import BlackBoxUnavailable

    with pytest.raises(BlackBoxUnavailable):
        run_sanitize(load_config(overrides=[
            f"source.uri={src.root}", f"output.uri={tmp_path / 'out'}",
            "blackbox.uri=v2+http://127.0.0.1:9/models/victim", "blackbox.retries=0", "blackbox.timeout_s=2"]))
    assert time.time() - t0 < 60
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))


def test_driver_killed_midway_then_rerun_has_every_key_once(tmp_path):
    """A separate driver process (its own local Ray) is killed once output starts to land; a rerun completes it."""
    import signal

    src = make_fmnist_shards(pafs.LocalFileSystem(), str(tmp_path / "src"), n_shards=8, per_shard=24,
                             fmt="parquet")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline", "sanitize", f"source.uri={src.root}", f"output.uri={out}",
           "purify.method=sdedit", "purify.params={t_start: 200, steps: 3}", "resources.purify_batch_size=8",
           "resources.query_batch_size=8", "resources.decode_batch_size=8", "resources.max_block_kib=16"]
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        if any(out.glob("*.parquet")):
            break
        time.sleep(0.2)
    # What the test is about: the driver must die mid-job. A first run that ended on its own (finished, or failed
    # before writing) would make the rerun below a plain second run, which proves nothing about resuming.
    assert first.poll() is None, f"the first run ended on its own (exit {first.returncode}) before it was killed"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    partial = read_output(pafs.LocalFileSystem(), str(out)).num_rows if any(out.glob("*.parquet")) else 0
    assert 0 < partial < len(src.expected), f"killed with {partial} of {len(src.expected)} rows written"
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = read_output(pafs.LocalFileSystem(), str(out))
    assert_exactly_once(table, src.expected)


def test_vote_gate_measured_on_the_first_rows(ray_local, tmp_path):
    """original_quantile: the gate is the quantile of the black box's top probability on the source's first rows,
    the same on a rerun, recorded with every row, and it is what decides where the original label votes."""
    import json

    import pyarrow.parquet as pq

    from pipeline.blackbox import InputSpec, open_blackbox

    shards = make_fmnist_shards(pafs.LocalFileSystem(), str(tmp_path / "src"), n_shards=2, per_shard=20,
                                fmt="parquet")
    cfg_overrides = [f"source.uri={tmp_path / 'src'}", f"output.uri={tmp_path / 'out'}", "purify.method=cascade",
                     CASCADE[:-1] + ", original_quantile: 0.5, calibration_rows: 16}", *FAST[1:]]
    cfg = load_config(overrides=cfg_overrides)
    summary = run_sanitize(cfg)

    first = pq.read_table(sorted((tmp_path / "src").glob("*.parquet"))[0]).slice(0, 16)
    images = np.stack([decode_png(b) for b in first["image"].to_pylist()])
    victim = open_blackbox(f"onnx:{REPO / 'models/victims/badnets.onnx'}", InputSpec())
    want = float(np.quantile(victim.predict(images).scores.max(1), 0.5))
    assert summary.gate == pytest.approx(want, abs=1e-6)
    assert summary.queries >= 16 + 2 * len(shards.expected)  # the measurement is billed like any query

    table = read_output(pafs.LocalFileSystem(), str(tmp_path / "out"))
    assert_exactly_once(table, shards.expected)
    rows = table.to_pylist()
    for r in rows:
        p = json.loads(r["params"])
        assert p["original_quantile"] == 0.5 and p["original_below"] == pytest.approx(want, abs=1e-6)
        if r["nfe"] == 3:  # decided after one pass: only where the gate let the original label vote
            assert r["score_orig"] < summary.gate and r["pred_purified"] == r["pred_orig"], r
    assert any(r["nfe"] == 3 for r in rows) and any(r["score_orig"] >= summary.gate for r in rows)

    again = run_sanitize(cfg)  # resume: nothing left to do; the gate its rows were decided with, not re-billed
    assert again.rows_this_run == 0 and again.gate == summary.gate and again.queries == 0
    (tmp_path / "out" / "_vote_gate.json").unlink()
    measured = run_sanitize(cfg)  # without the saved gate, the same first rows measure the same gate
    assert measured.gate == summary.gate and measured.queries == 16
    # Another black box resumes this output: the saved gate measured another model's answers, so it is measured again.
    saved = json.loads((tmp_path / "out" / "_vote_gate.json").read_text())
    other = load_config(overrides=[*cfg_overrides, f"blackbox.uri=onnx:{REPO / 'models/victims/blended.onnx'}"])
    assert run_sanitize(other).queries == 16
    assert json.loads((tmp_path / "out" / "_vote_gate.json").read_text())["measured_for"] != saved["measured_for"]


def test_the_driver_measures_the_gate_without_torch():
    """The driver never loads torch (the model check runs in a short-lived process); the vote's gate, which the
    driver measures, must not bring it back."""
    code = ("import sys; from pipeline.config import load_config; import pipeline.job as j; "
            "assert j.measured_gate(load_config(overrides=[])) == (0.3, 256); "
            "assert 'torch' not in sys.modules, 'the driver imported torch'")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
