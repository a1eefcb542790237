"""Sources (Parquet / WebDataset / image folder, local and S3 through Ray), decoding of bad inputs, the output
schema, and fail-fast storage checks."""

from __future__ import annotations

import io
import json
import socket
import struct
import tarfile
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from pipeline.decode import decode_batch, decode_image, decode_png, encode_png
from pipeline.sink import OUTPUT_SCHEMA, output_schema, to_output_batch
from pipeline.sources import (
    SourceError,
    SourceSpec,
    checkpoint_config,
    id_column,
    in_sample,
    inspect_source,
    list_shards,
    read_source,
    row_count,
)
from pipeline.sources.base import label_value
from pipeline.storage import StorageError, check_readable, check_writable, describe, resolve_filesystem
from tests.plugins.s3 import make_fmnist_shards

HYPOTHESIS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def _save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


# --- reading through Ray ---

def _location(where: str, tmp_path, s3_server) -> tuple[pafs.FileSystem, str, str | None]:
    if where == "local":
        return pafs.LocalFileSystem(), str(tmp_path / "src"), None
    bucket = s3_server.make_bucket()
    return s3_server.filesystem(), f"{bucket}/data/in", s3_server.endpoint_url


def _rows(ds) -> list[dict]:
    return [row for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None) for row in batch.to_pylist()]


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("fmt", ["parquet", "webdataset", "imagefolder"])
def test_read_every_key_once(ray_local, tmp_path, s3_server, fmt, where):
    fs, root, endpoint = _location(where, tmp_path, s3_server)
    shards = make_fmnist_shards(fs, root, n_shards=3, per_shard=7, fmt=fmt)
    spec = SourceSpec(uri=shards.uri, format=fmt, endpoint_url=endpoint)
    native = id_column(spec)
    assert native == {"parquet": "key", "webdataset": "sample_id", "imagefolder": "path"}[fmt]

    rows = _rows(read_source(spec))

    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == len(shards.expected)
    assert set(keys) == set(shards.expected)
    assert all(r["label"] == shards.expected[r["key"]] for r in rows)
    assert {r["shard"] for r in rows} <= set(shards.paths)
    assert len({r[native] for r in rows}) == len(rows), "the resume id column must be unique"
    for r in rows[:5]:
        assert np.array_equal(decode_png(r["image_bytes"])[0], shards.images[r["key"]])


def test_parquet_without_key_and_label_columns(ray_local, tmp_path):
    fs = pafs.LocalFileSystem()
    shards = make_fmnist_shards(fs, str(tmp_path / "nokey"), 2, 9, "parquet", with_keys=False, with_labels=False)
    spec = SourceSpec(uri=shards.uri)
    assert id_column(spec) == "row_hash"
    rows = _rows(read_source(spec))
    assert sorted(r["key"] for r in rows) == sorted(shards.expected)  # "shard-00000.parquet:<row>"
    assert {r["label"] for r in rows} == {-1}
    assert len({r["row_hash"] for r in rows}) == len(rows)


@pytest.mark.parametrize("fmt", ["parquet", "webdataset", "imagefolder"])
def test_sample_is_the_same_rows_whatever_the_read(ray_local, tmp_path, fmt):
    """A sample is decided by each row's key: the rows every key predicts, in every shard, at any parallelism."""
    shards = make_fmnist_shards(pafs.LocalFileSystem(), str(tmp_path / "src"), 4, 25, fmt)
    counted = row_count(SourceSpec(uri=shards.uri, format=fmt), list_images=True)
    assert counted == (None if fmt == "webdataset" else 100)
    want = {k for k in shards.expected if in_sample(k, 0.3, seed=5)}
    assert 15 <= len(want) <= 45
    spec = SourceSpec(uri=shards.uri, format=fmt, sample_fraction=0.3, sample_seed=5)
    keys = [r["key"] for r in _rows(read_source(spec))]
    assert sorted(keys) == sorted(want)
    if fmt != "imagefolder":  # (an image folder's shards are its files)
        assert len({r["shard"] for r in _rows(read_source(spec))}) == 4, "spread over every shard"
    other = {r["key"] for r in _rows(read_source(SourceSpec(uri=shards.uri, format=fmt, sample_fraction=0.3)))}
    assert other != want, "another seed draws another sample"
    capped = _rows(read_source(SourceSpec(uri=shards.uri, format=fmt, sample_fraction=0.3, sample_seed=5, limit=6)))
    assert len(capped) == 6 and {r["key"] for r in capped} <= want


def test_sample_draw_is_nested_and_at_its_rate() -> None:
    keys = [f"shard-{i // 1000:05d}.parquet:{i % 1000}" for i in range(20_000)]
    small = {k for k in keys if in_sample(k, 0.1, seed=3)}
    large = {k for k in keys if in_sample(k, 0.25, seed=3)}
    assert small <= large, "a larger fraction keeps every row of a smaller one"
    for got, p in ((small, 0.1), (large, 0.25)):  # within 5 standard errors of the binomial draw
        assert abs(len(got) / len(keys) - p) < 5 * (p * (1 - p) / len(keys)) ** 0.5
    assert all(in_sample(k, 1.0) for k in keys[:100])
    for bad in ({"sample_fraction": 0.0}, {"sample_fraction": 1.5}, {"sample_seed": -1}):
        with pytest.raises(ValueError, match="sample_"):
            SourceSpec(uri="x", **bad)


def test_odd_labels_in_later_shards_read_as_unknown(ray_local, tmp_path):
    """Only the first shard's label type must be integers; labels a later shard (or a tar member) holds that are
    no class id read as -1 instead of failing the read task, and with it the job."""
    png = encode_png(np.zeros((1, 1, 28, 28), np.uint8))[0]
    root = tmp_path / "pq"
    root.mkdir()
    pq.write_table(pa.table({"key": ["a0", "a1"], "image": [png] * 2, "label": pa.array([3, -4], pa.int64())}),
                   root / "a.parquet")
    pq.write_table(pa.table({"key": ["b0"], "image": [png], "label": pa.array([7], pa.uint64())}), root / "b.parquet")
    # an integer column with gaps, as pandas writes it
    pq.write_table(pa.table({"key": ["c0", "c1", "c2"], "image": [png] * 3,
                             "label": pa.array([5.0, float("nan"), 2.5])}), root / "c.parquet")
    labels = {r["key"]: r["label"] for r in _rows(read_source(SourceSpec(uri=str(root))))}
    assert labels == {"a0": 3, "a1": -1, "b0": 7, "c0": 5, "c1": -1, "c2": -1}
    # Types Arrow cannot unify fail up front, naming the cause, before any task runs.
    pq.write_table(pa.table({"key": ["d0"], "image": [png], "label": ["8"]}), root / "d.parquet")
    with pytest.raises(SourceError, match="disagree on a column's type.*label"):
        read_source(SourceSpec(uri=str(root)))
    assert [label_value(v) for v in ("8", b" 9\n", "cat", None, "-2", 2**64, 4.0, float("inf"), True)] == \
        [8, 9, -1, -1, -1, -1, 4, -1, -1]

    tars = tmp_path / "wds"
    tars.mkdir()
    with tarfile.open(tars / "s.tar", "w") as tar:
        for key, cls in (("0", b"99999999999999999999"), ("1", b" 4\n"), ("2", "\u0663".encode()), ("3", b"1_0")):
            for name, data in ((f"{key}.png", png), (f"{key}.cls", cls)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    labels = {r["key"]: r["label"] for r in _rows(read_source(SourceSpec(uri=str(tars), format="webdataset")))}
    assert labels == {"s.tar/0": -1, "s.tar/1": 4, "s.tar/2": -1, "s.tar/3": -1}


@pytest.mark.parametrize("reader_v2", [True, False], ids=["reader-v2", "reader-v1"])
def test_later_shards_lacking_columns_or_with_other_label_types_give_rows(ray_local, tmp_path, reader_v2):
    """Shards past the first lack the key, label or image column, or hold float / unsigned labels, after more
    shards than Ray samples for its schema: each row comes out (a missing key or image as an error row, an unusable
    label as -1) under both of Ray's Parquet readers, instead of failing its read task."""
    import ray.data

    png = encode_png(np.zeros((1, 1, 28, 28), np.uint8))[0]
    root = tmp_path / "pq"
    root.mkdir()
    for i in range(16):  # Ray 2.60's reader infers the schema from the first 16 files
        pq.write_table(pa.table({"key": [f"a{i}"], "image": [png], "label": pa.array([i % 10], pa.int64())}),
                       root / f"a{i:02d}.parquet")
    pq.write_table(pa.table({"key": ["b0"], "image": [png]}), root / "b.parquet")
    pq.write_table(pa.table({"image": [png], "label": pa.array([4], pa.int64())}), root / "c.parquet")
    pq.write_table(pa.table({"key": ["d0"], "label": pa.array([5], pa.int64())}), root / "d.parquet")
    pq.write_table(pa.table({"key": ["e0", "e1"], "image": [png] * 2, "label": pa.array([6.0, 2.5])}),
                   root / "e.parquet")
    pq.write_table(pa.table({"key": ["f0", "f1"], "image": [png] * 2,
                             "label": pa.array([7, 2**63 + 5], pa.uint64())}), root / "f.parquet")
    context = ray.data.DataContext.get_current()
    before = context.use_datasource_v2
    context.use_datasource_v2 = reader_v2
    try:
        rows = {r["key"]: r for r in _rows(read_source(SourceSpec(uri=str(root))))}
    finally:
        context.use_datasource_v2 = before
    assert len(rows) == 16 + 1 + 1 + 1 + 2 + 2
    assert all(rows[f"a{i}"]["label"] == i % 10 and rows[f"a{i}"]["error"] is None for i in range(16))
    assert rows["b0"]["label"] == -1 and rows["b0"]["error"] is None and rows["b0"]["image_bytes"] == png
    (keyless,) = [r for k, r in rows.items() if r["shard"].endswith("c.parquet")]
    assert keyless["error"] == "missing key (column 'key' is null)" and keyless["label"] == 4
    assert rows["d0"]["image_bytes"] is None and rows["d0"]["label"] == 5
    out = decode_batch({"image_bytes": np.array([rows["d0"]["image_bytes"]], dtype=object),
                        "error": np.array([rows["d0"]["error"]], dtype=object)}, 28, 1)
    assert out["error"][0] == "missing image"
    assert [rows[k]["label"] for k in ("e0", "e1", "f0", "f1")] == [6, -1, 7, -1]


def test_a_first_shard_lacking_columns_does_not_decide_for_the_rest(ray_local, tmp_path):
    """The first shard (by name) has neither labels nor keys nor images: the later shards keep theirs, and the
    first shard's rows come out as error rows rather than failing the job or dropping every label."""
    png = encode_png(np.zeros((1, 1, 28, 28), np.uint8))[0]
    root = tmp_path / "pq"
    root.mkdir()
    pq.write_table(pa.table({"other": pa.array([1, 2], pa.int64())}), root / "a.parquet")
    pq.write_table(pa.table({"key": ["b0", "b1"], "image": [png] * 2, "label": pa.array([3, 8], pa.int64())}),
                   root / "b.parquet")
    rows = _rows(read_source(SourceSpec(uri=str(root))))
    assert len(rows) == 4
    by_key = {r["key"]: r for r in rows if r["key"] is not None}
    assert by_key["b0"]["label"] == 3 and by_key["b1"]["label"] == 8 and by_key["b0"]["image_bytes"] == png
    first = [r for r in rows if r["shard"].endswith("a.parquet")]
    assert len(first) == 2 and all(r["error"] == "missing key (column 'key' is null)" for r in first)
    assert all(r["image_bytes"] is None and r["label"] == -1 for r in first)


def test_a_later_shard_whose_footer_cannot_be_read_is_refused_naming_it(ray_local, tmp_path):
    png = encode_png(np.zeros((1, 1, 28, 28), np.uint8))[0]
    root = tmp_path / "pq"
    root.mkdir()
    pq.write_table(pa.table({"image": [png] * 3}), root / "a.parquet")
    (root / "b-empty.parquet").write_bytes(b"")  # was read as no rows at all
    spec = SourceSpec(uri=str(root), key_column=None)
    with pytest.raises(SourceError, match=r"cannot read the Parquet schema of .*b-empty\.parquet"):
        read_source(spec)
    (root / "b-empty.parquet").unlink()
    whole = (root / "a.parquet").read_bytes()
    (root / "c-cut.parquet").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(SourceError, match=r"cannot read the Parquet schema of .*c-cut\.parquet"):
        read_source(SourceSpec(uri=str(root), key_column=None))


def test_unsigned_64_bit_keys_are_refused_before_the_read(ray_local, tmp_path):
    """Keys travel as int64; one past 2**63 failed every block it was in (and wrapping it would collide with the
    negative stand-ins of null keys)."""
    png = encode_png(np.zeros((1, 1, 28, 28), np.uint8))[0]
    root = tmp_path / "pq"
    root.mkdir()
    pq.write_table(pa.table({"id": pa.array([2**63 + 1, 5], pa.uint64()), "image": [png] * 2}), root / "a.parquet")
    with pytest.raises(SourceError, match=r"'id' in .*a\.parquet has type uint64.*cast the column to int64 or string"):
        _rows(read_source(SourceSpec(uri=str(root), key_column="id")))
    # the same in a later shard than the first
    pq.write_table(pa.table({"id": pa.array([1, 2], pa.int64()), "image": [png] * 2}), root / "0.parquet")
    with pytest.raises(SourceError, match=r"'id' in .*a\.parquet has type uint64"):
        _rows(read_source(SourceSpec(uri=str(root), key_column="id")))
    # and a key column whose type differs in kind between shards
    pq.write_table(pa.table({"id": ["x", "y"], "image": [png] * 2}), root / "a.parquet")
    with pytest.raises(SourceError, match=r"disagree on a column's type: 'id' is string in .*a\.parquet"):
        _rows(read_source(SourceSpec(uri=str(root), key_column="id")))


@pytest.mark.parametrize(("option", "name"), [("key_column", "path"), ("key_column", "row_hash"),
                                              ("label_column", "row_hash"), ("image_column", "path")])
def test_a_column_named_like_one_rays_reader_adds_is_refused(ray_local, tmp_path, option, name):
    png = encode_png(np.zeros((1, 1, 28, 28), np.uint8))[0]
    columns = {"image": [png, png], "label": pa.array([1, 2], pa.int64()), name: ["k1", "k2"]}
    if option == "image_column":
        columns = {name: [png, png], "key": ["k1", "k2"]}
    elif option == "label_column":
        columns[name] = pa.array([1, 2], pa.int64())
    pq.write_table(pa.table(columns), tmp_path / "s.parquet")
    with pytest.raises(SourceError, match=rf"source\.{option} '{name}' is also a column Ray's Parquet reader adds"):
        _rows(read_source(SourceSpec(uri=str(tmp_path), **{option: name})))


def test_limit_and_decode_in_ray(ray_local, tmp_path):
    fs = pafs.LocalFileSystem()
    shards = make_fmnist_shards(fs, str(tmp_path / "lim"), 2, 10, "parquet")
    ds = read_source(SourceSpec(uri=shards.uri, limit=7)).map_batches(
        decode_batch, batch_format="numpy", fn_kwargs={"size": 28, "channels": 1}
    )
    rows = ds.take_all()
    assert len(rows) == 7
    for r in rows:
        assert r["error"] is None and "image_bytes" not in r
        assert np.array_equal(r["image"][0], shards.images[r["key"]])


def test_webdataset_resume_with_keys_repeated_across_shards(ray_local, tmp_path):
    """Every shard numbers its samples from 000000: the resume id must still tell them apart."""
    import ray.data

    shards = make_fmnist_shards(pafs.LocalFileSystem(), str(tmp_path / "wds"), 2, 6, "webdataset", global_keys=False)
    context = ray.data.DataContext.get_current()
    out = str(tmp_path / "out")
    try:
        for limit in (4, None, None):  # a run cut short, the resumed run, a run with nothing left to do
            spec = SourceSpec(uri=shards.uri, format="webdataset", limit=limit)
            context.checkpoint_config = checkpoint_config(spec, str(tmp_path / "ckpt"))
            ds = read_source(spec).map_batches(
                to_output_batch, batch_format="numpy", fn_kwargs={"method": "none", "id_column": "sample_id"})
            ds.write_parquet(out, mode="append")  # as the job writes: appended, for resume
    finally:
        context.checkpoint_config = None
    keys = pq.read_table(out)["key"].to_pylist()
    assert sorted(keys) == sorted(shards.expected) and len(keys) == 12


def test_pipeline_writes_output_schema_to_s3(ray_local, s3_server):
    bucket = s3_server.make_bucket()
    fs = s3_server.filesystem()
    shards = make_fmnist_shards(fs, f"{bucket}/in", 2, 6, "webdataset")
    spec = SourceSpec(uri=shards.uri, format="webdataset", endpoint_url=s3_server.endpoint_url)

    def fake_stages(batch: dict) -> pa.Table:
        n = len(batch["key"])
        batch["purified"] = batch["image"]
        batch["pred_orig"] = batch["label"]
        batch["pred_purified"] = np.where(batch["label"] % 2 == 0, (batch["label"] + 1) % 10, batch["label"])
        batch["score_orig"] = np.full(n, 0.9, dtype=np.float32)
        batch["score_purified"] = np.full(n, 0.8, dtype=np.float32)
        batch["nfe"] = np.full(n, 4.0, dtype=np.float32)
        return to_output_batch(batch, method="zip", params={"t": 100}, keep_orig=True, id_column="sample_id")

    ds = read_source(spec).map_batches(decode_batch, batch_format="numpy", fn_kwargs={"size": 28, "channels": 1})
    ds.map_batches(fake_stages, batch_format="numpy").write_parquet(f"{bucket}/out", filesystem=fs, mode="append")

    table = pq.read_table(f"{bucket}/out", filesystem=fs)
    assert table.schema.equals(output_schema(keep_orig=True, id_column="sample_id"), check_metadata=False)
    assert table["sample_id"][0].as_py().startswith(f"{bucket}/in/shard-0000")
    assert sorted(table["key"].to_pylist()) == sorted(shards.expected)
    flagged = dict(zip(table["key"].to_pylist(), table["flagged"].to_pylist(), strict=True))
    assert flagged == {key: label % 2 == 0 for key, label in shards.expected.items()}
    for key, png in zip(table["key"].to_pylist(), table["image_png"].to_pylist(), strict=True):
        assert np.array_equal(decode_png(png)[0], shards.images[key])
    assert json.loads(table["params"][0].as_py()) == {"t": 100}


# --- validation before any Ray work ---

def test_parquet_missing_image_column_names_the_file(tmp_path):
    pq.write_table(pa.table({"img": [b"x"], "label": [1]}), tmp_path / "a.parquet")
    with pytest.raises(SourceError, match=r"image column 'image' not found in .*a\.parquet"):
        inspect_source(SourceSpec(uri=str(tmp_path)))


def test_parquet_bad_column_types(tmp_path):
    pq.write_table(pa.table({"image": ["text"], "label": [1]}), tmp_path / "s.parquet")
    with pytest.raises(SourceError, match="has type string; expected binary"):
        inspect_source(SourceSpec(uri=str(tmp_path / "s.parquet")))
    pq.write_table(pa.table({"image": [b"x"], "label": ["cat"]}), tmp_path / "s.parquet")
    with pytest.raises(SourceError, match="label column 'label' .* expected integers"):
        inspect_source(SourceSpec(uri=str(tmp_path / "s.parquet")))
    info = inspect_source(SourceSpec(uri=str(tmp_path / "s.parquet"), label_column=None))
    assert not info.has_label


def test_unreadable_shards_name_the_file(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match=r"bad\.parquet"):
        inspect_source(SourceSpec(uri=str(tmp_path / "p")))
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "bad.tar").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(SourceError, match=r"bad\.tar"):
        inspect_source(SourceSpec(uri=str(tmp_path / "w"), format="webdataset"))
    with tarfile.open(tmp_path / "w" / "bad.tar", "w") as tar:
        info = tarfile.TarInfo("0001.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(SourceError, match=r"no image member .*bad\.tar"):
        inspect_source(SourceSpec(uri=str(tmp_path / "w"), format="webdataset"))


def test_shard_listing_rules(tmp_path):
    with pytest.raises(SourceError, match="no parquet shards"):
        list_shards(SourceSpec(uri=str(tmp_path)))
    for rel in ["b.parquet", "a.parquet", "sub/c.PARQUET", "_checkpoint/x.parquet", ".hidden.parquet", "notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert [p.rsplit("/", 1)[-1] for p in list_shards(SourceSpec(uri=str(tmp_path)))] == [
        "a.parquet", "b.parquet", "c.PARQUET"]
    with pytest.raises(SourceError, match="must be a directory"):
        list_shards(SourceSpec(uri=str(tmp_path / "a.parquet"), format="imagefolder"))
    with pytest.raises(ValueError, match="unknown source format"):
        SourceSpec(uri="x", format="csv")


def test_imagefolder_without_class_dirs_has_no_labels(tmp_path):
    (tmp_path / "x.png").write_bytes(_png(np.zeros((4, 4), np.uint8)))
    info = inspect_source(SourceSpec(uri=str(tmp_path), format="imagefolder"))
    assert info.classes == [] and info.id_column == "path"


# --- fail fast on storage ---

def test_missing_bucket_fails_fast(s3_server):
    spec = SourceSpec(uri="s3://no-such-bucket-here/x", endpoint_url=s3_server.endpoint_url)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' .* does not exist"):
        list_shards(spec)
    fs, path = resolve_filesystem("s3://no-such-bucket-here/out", s3_server.endpoint_url)
    with pytest.raises(StorageError, match="does not exist; create it first"):
        check_writable(fs, path)
    assert time.monotonic() - t0 < 10


def test_wrong_path_fails_fast(s3_server):
    bucket = s3_server.make_bucket()
    with pytest.raises(StorageError, match=rf"no such file or directory: s3://{bucket}/nothing/here at http://"):
        list_shards(SourceSpec(uri=f"s3://{bucket}/nothing/here", endpoint_url=s3_server.endpoint_url))


def test_closed_port_fails_fast_with_clear_message():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    fs, path = resolve_filesystem("s3://bucket/prefix", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"cannot reach the storage endpoint .* after 2 attempt"):
        check_readable(fs, path, attempts=2, backoff_s=0.05)
    assert time.monotonic() - t0 < 30


class _RefusingFS:
    """Stands in for an S3 filesystem whose credentials are rejected (moto does not check credentials)."""

    type_name = "s3"
    calls = 0

    def get_file_info(self, path):
        self.calls += 1
        raise OSError("When getting information for key 'p' in bucket 'b': AWS Error ACCESS_DENIED during "
                      "HeadObject operation: No response body. HTTP response code 403")


def test_bad_credentials_are_not_retried_and_not_shown(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    fs = _RefusingFS()
    with pytest.raises(StorageError, match="credentials are missing, wrong or lack permission") as err:
        check_readable(fs, "b/p", attempts=3, backoff_s=0.01)
    assert fs.calls == 1
    assert "very-secret-value" not in str(err.value)


def test_writable_checks(tmp_path, s3_server):
    check_writable(pafs.LocalFileSystem(), str(tmp_path / "out" / "deep"))
    assert list((tmp_path / "out" / "deep").iterdir()) == []  # the probe is removed
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError, match="is an existing file"):
        check_writable(pafs.LocalFileSystem(), str(tmp_path / "file"))
    bucket = s3_server.make_bucket()
    fs, path = resolve_filesystem(f"s3://{bucket}/results/", s3_server.endpoint_url)
    check_writable(fs, path)
    check_writable(fs, bucket)


def test_resolve_filesystem(monkeypatch, tmp_path):
    fs, path = resolve_filesystem(str(tmp_path / "a"))
    assert fs.type_name == "local" and path == str(tmp_path / "a")
    assert resolve_filesystem(f"file://{tmp_path}/b")[1] == f"{tmp_path}/b"
    monkeypatch.setenv("S3_ENDPOINT_URL", "https://minio.internal:9000")
    fs, path = resolve_filesystem("s3://bucket/some/prefix/")
    assert path == "bucket/some/prefix"
    assert describe(fs, path) == "s3://bucket/some/prefix at https://minio.internal:9000"
    fs, _ = resolve_filesystem("s3://bucket", endpoint_url="http://127.0.0.1:1")
    assert describe(fs, "bucket").endswith("at http://127.0.0.1:1")
    with pytest.raises(StorageError, match="no bucket"):
        resolve_filesystem("s3:///x")


# --- decoding: every bad input is an error row ---

GREY = (np.arange(28 * 28).reshape(28, 28) % 251).astype(np.uint8)


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge image, with almost no data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(
        b"IEND", b"")


@pytest.mark.parametrize(("data", "kwargs", "reason"), [
    (None, {}, "missing image"),
    (b"", {}, "empty image"),
    (b"this is not an image at all", {}, "not an image"),
    (_png(GREY)[:60], {}, "truncated or corrupt image"),
    (_png(GREY)[: len(_png(GREY)) // 2], {}, "truncated or corrupt image"),
    (_save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")[:900], {},
     "truncated or corrupt image"),
    (_bomb_png(100_000, 100_000), {}, "image too large"),
    (_png(GREY), {"max_pixels": 100}, "image too large (28x28 pixels)"),
    (_png(GREY), {"max_bytes": 100}, "image too large ("),
    (_png(np.zeros((20, 30), np.uint8)), {"policy": "reject"}, "wrong size 20x30"),
])
def test_bad_inputs_become_error_rows(data, kwargs, reason):
    batch = {"image_bytes": np.array([data, _png(GREY)], dtype=object), "key": np.array(["bad", "good"]),
             "label": np.array([3, 4]), "shard": np.array(["s", "s"]), "path": np.array(["p1", "p2"])}
    out = decode_batch(batch, size=28, channels=1, **kwargs)
    assert out["error"][0].startswith(reason)
    assert not out["image"][0].any()
    if not {"max_pixels", "max_bytes"} & set(kwargs):  # those limits refuse the good row too
        assert out["error"][1] is None and np.array_equal(out["image"][1, 0], GREY)
    assert list(out["key"]) == ["bad", "good"] and list(out["path"]) == ["p1", "p2"] and "image_bytes" not in out


def test_pil_bomb_warning_becomes_error_row(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 784 px: past PIL's warning level, short of its error
    assert decode_image(_png(GREY), 28, 1) == (None, "image too large")


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 28 * 28).round().astype(np.uint16).reshape(28, 28)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    arr, err = decode_image(_save(img, "PNG"), 28, 1)
    assert err is None
    expected = ((values.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    assert np.array_equal(arr[0], expected) and arr.max() == 255 and arr.min() == 0


@pytest.mark.parametrize("mode", ["CMYK", "P", "LA", "RGBA", "RGB", "L", "1"])
@pytest.mark.parametrize("channels", [1, 3])
def test_modes_convert_to_channels(mode, channels):
    rgba = np.random.default_rng(1).integers(0, 256, (28, 28, 4), dtype=np.uint8)
    img = Image.fromarray(rgba, "RGBA").convert(mode)
    data = _save(img, "TIFF" if mode == "CMYK" else "PNG")
    arr, err = decode_image(data, 28, channels)
    assert err is None and arr.shape == (channels, 28, 28) and arr.dtype == np.uint8
    reference = Image.open(io.BytesIO(data))
    if reference.mode in ("P", "PA"):
        reference = reference.convert("RGBA")
    expected = np.asarray(reference.convert("L" if channels == 1 else "RGB"))
    assert np.array_equal(arr, expected[None] if channels == 1 else expected.transpose(2, 0, 1))


def test_size_policies():
    small = np.full((20, 10), 200, np.uint8)
    arr, _ = decode_image(_png(small), 28, 1, "pad")
    assert arr.shape == (1, 28, 28) and arr[0, 4:24, 9:19].min() == 200 and arr.sum() == 200 * 20 * 10
    big = np.arange(40 * 40, dtype=np.int64).reshape(40, 40).astype(np.uint8)
    arr, _ = decode_image(_png(big), 28, 1, "pad")
    assert np.array_equal(arr[0], big[6:34, 6:34])
    arr, _ = decode_image(_png(big), 28, 1, "resize")
    expected = np.asarray(Image.fromarray(big).resize((28, 28), Image.Resampling.BILINEAR))
    assert np.array_equal(arr[0], expected)
    large_jpeg = _save(Image.fromarray(np.full((400, 300, 3), 90, np.uint8)), "JPEG")
    arr, err = decode_image(large_jpeg, 28, 3, "resize")
    assert err is None and arr.shape == (3, 28, 28) and abs(int(arr.mean()) - 90) <= 2
    with pytest.raises(ValueError, match="size policy"):
        decode_batch({"image_bytes": np.array([], dtype=object)}, 28, 1, "stretch")


def test_empty_batch():
    out = decode_batch({"image_bytes": np.array([], dtype=object), "key": np.array([], dtype=object)}, 28, 3)
    assert out["image"].shape == (0, 3, 28, 28) and out["error"].shape == (0,)


def test_decode_reads_an_incoming_error_cell_as_the_later_stages_do():
    """Between Ray stages an all-null error column may arrive as NaN or "": those mean "no error" to decode too,
    or the row would skip decode and reach purification as a blank image marked fine."""
    png = encode_png(np.full((1, 1, 28, 28), 200, np.uint8))[0]
    batch = {"image_bytes": np.array([png] * 4, dtype=object),
             "error": np.array([np.float32("nan"), "", None, "missing key"], dtype=object)}
    out = decode_batch(batch, 28, 1)
    assert out["error"].tolist() == [None, None, None, "missing key"]
    assert (out["image"][:3] == 200).all() and (out["image"][3] == 0).all()


# --- property tests ---

images_strategy = st.tuples(
    st.integers(1, 3), st.sampled_from([1, 3]), st.integers(1, 24), st.integers(1, 24)
).flatmap(lambda s: hnp.arrays(np.uint8, s))


@HYPOTHESIS
@given(images_strategy)
def test_png_round_trip(images):
    decoded = [decode_png(png) for png in encode_png(images)]
    assert all(np.array_equal(d, img) for d, img in zip(decoded, images, strict=True))


@HYPOTHESIS
@given(st.tuples(st.integers(1, 3), st.sampled_from([1, 3]), st.integers(1, 24)).flatmap(
    lambda s: hnp.arrays(np.uint8, (s[0], s[1], s[2], s[2]))))
def test_decode_batch_round_trip(images):
    n, c, size, _ = images.shape
    out = decode_batch({"image_bytes": np.array(encode_png(images), dtype=object)}, size=size, channels=c)
    assert list(out["error"]) == [None] * n
    assert np.array_equal(out["image"], images)


@st.composite
def output_batches(draw):
    n = draw(st.integers(0, 6))
    maybe_int = st.one_of(st.integers(-1, 9), st.none())
    maybe_float = st.one_of(st.floats(0, 1, width=32), st.just(float("nan")))
    return {
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "shard": np.array(["s.tar"] * n, dtype=object),
        "label": np.array(draw(st.lists(st.integers(-1, 9), min_size=n, max_size=n)), dtype=np.int64),
        "image": draw(hnp.arrays(np.uint8, (n, 1, 4, 4))),
        "purified": draw(hnp.arrays(np.uint8, (n, 1, 4, 4))),
        "pred_orig": draw(st.lists(maybe_int, min_size=n, max_size=n)),
        "pred_purified": np.array(draw(st.lists(st.integers(-1, 9), min_size=n, max_size=n)), dtype=np.int64),
        "score_orig": np.array(draw(st.lists(maybe_float, min_size=n, max_size=n)), dtype=np.float32),
        "flag_score": draw(st.lists(maybe_float, min_size=n, max_size=n)),
        "nfe": np.array(draw(st.lists(st.floats(0, 64, width=32), min_size=n, max_size=n)), dtype=np.float32),
        "error": np.array(draw(st.lists(st.sampled_from([None, "not an image"]), min_size=n, max_size=n)),
                          dtype=object),
        "__key__": np.array([f"{i:04d}" for i in range(n)], dtype=object),
    }


@HYPOTHESIS
@given(output_batches(), st.booleans())
def test_output_batch_schema(batch, keep_orig):
    table = to_output_batch(batch, method="sdedit", params={"b": 1, "a": [2]}, keep_orig=keep_orig,
                            id_column="__key__")
    n = len(batch["key"])
    assert table.num_rows == n
    assert table.schema.equals(output_schema(keep_orig, "__key__"), check_metadata=False)
    assert table.schema.names[: len(OUTPUT_SCHEMA)] == OUTPUT_SCHEMA.names
    for name in ("key", "shard", "method", "params", "nfe"):
        assert table[name].null_count == 0
    assert set(table["params"].to_pylist()) <= {'{"a":[2],"b":1}'}
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        bad = batch["error"][i] is not None
        assert row["error"] == batch["error"][i]
        assert (row["image_png"] is None) == bad
        if keep_orig:
            assert (row["image_orig_png"] is None) == bad
            if not bad:
                assert np.array_equal(decode_png(row["image_orig_png"]), batch["image"][i])
        if not bad:
            assert np.array_equal(decode_png(row["image_png"]), batch["purified"][i])
        label = int(batch["label"][i])
        assert row["label"] == (label if label >= 0 else None)
        po, pp = batch["pred_orig"][i], int(batch["pred_purified"][i])
        expect_po = None if bad or po is None or po < 0 else po
        expect_pp = None if bad or pp < 0 else pp
        assert (row["pred_orig"], row["pred_purified"]) == (expect_po, expect_pp)
        expect_flag = None if expect_po is None or expect_pp is None else expect_po != expect_pp
        assert row["flagged"] == expect_flag
        assert row["score_orig"] is None or not bad
        assert row["__key__"] == batch["__key__"][i]


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_a_job_lists_the_source_once(ray_local, tmp_path, monkeypatch, fmt):
    """The job's calls (inspect, resume config, duplicate keys, read) share one listing per spec; a new spec lists
    again, so a rerun sees new shards. Counted with a spy around the real listing."""
    import pipeline.sources.base as base
    from pipeline.sources import duplicate_keys, source_format

    fs = pafs.LocalFileSystem()
    shards = make_fmnist_shards(fs, str(tmp_path / "src"), 2, 3, fmt)
    calls: list[str] = []
    real = base.list_shards

    def spy(spec, fs=None):
        calls.append(spec.uri)
        return real(spec, fs)

    monkeypatch.setattr(source_format(SourceSpec(uri="x", format=fmt)), "list_shards", spy)
    spec = SourceSpec(uri=shards.uri, format=fmt)
    info = inspect_source(spec, fs)
    checkpoint_config(spec, str(tmp_path / "ckpt"))
    duplicate_keys(spec, fs)
    assert len(read_source(spec, fs).take_all()) == 6
    assert len(calls) == 1 and info.id_column == id_column(spec)
    make_fmnist_shards(fs, str(tmp_path / "src" / "more"), 1, 3, fmt)
    assert len(read_source(SourceSpec(uri=shards.uri, format=fmt), fs).take_all()) == 9
    assert len(calls) == 2
