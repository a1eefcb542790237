"""The hostile-input catalogue: crafted inputs against the pure functions, the readers (through a local Ray cluster)
and the black-box clients (against real local HTTP servers). Each test names what an attacker or a careless user
does and what must happen instead of a crash, a silent loss, unbounded memory or time, or a leaked secret."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import tarfile
import time
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.blackbox import MAX_LABEL, BlackBoxUnavailable, InputSpec, Prediction, open_blackbox, parse_output
from pipeline.config import load_config
from pipeline.decode import decode_batch, decode_image
from pipeline.sink import to_output_batch
from pipeline.sources import SourceError, SourceSpec, read_source
from pipeline.storage import StorageError, describe, resolve_filesystem
from tests.plugins.blackbox import send_raw, v2_answer

TOKEN = "tok-Zq8Wv3Lm5Nx1Pr7Ks2"
SPEC = InputSpec()


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


def _quick(**kw: object) -> dict:
    return {"backoff_s": 0.01, "max_backoff_s": 0.02, "retries": 0, "timeout_s": 5.0, **kw}


def _png(img: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save)
    return buf.getvalue()


def _rows(ds) -> list[dict]:
    return [row for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None) for row in batch.to_pylist()]


# ---------------------------------------------------------------------------------------------------------------
# 2. One input must not stop the job.


def test_huge_and_negative_labels_fail_their_rows_not_the_job(crafted_v2_server):
    # a black box answering label ids later code would allocate by (2e6, 1e12) or that mean nothing (-1, -7)
    answers = [3, 2_000_000, -1, 10**12, -7, MAX_LABEL]
    srv = crafted_v2_server(lambda i, n, h: send_raw(h, 200, v2_answer(answers[:n], [n], "INT64")))
    with open_blackbox(srv.url, SPEC, **_quick()) as bb:
        pred = bb.predict(_images(6))
        stats = bb.stats()
    assert pred.labels.tolist() == [3, -1, -1, -1, -1, MAX_LABEL]
    assert pred.errors[0] is None and pred.errors[5] is None
    for i, bad in ((1, 2_000_000), (2, -1), (3, 10**12), (4, -7)):
        assert pred.errors[i] == f"bad response: label {bad} outside [0, {MAX_LABEL}]"
        assert pred.retryable[i], "the endpoint's answer, not the row's data: a later run asks again"
    assert stats["ok"] == 2 and stats["failures"] == 4 and stats["rows"] == stats["ok"] + stats["failures"]


def test_parse_output_bounds_every_label() -> None:
    pred = parse_output(np.array([[5], [-2], [MAX_LABEL + 1]], dtype=np.int64), 3)
    assert pred.labels.tolist() == [5, -1, -1] and pred.failed.tolist() == [False, True, True]
    # an unsigned id past 2**63 must not wrap into range on the way to int64
    pred = parse_output(np.array([2**64 - 1, 4], dtype=np.uint64), 2)
    assert pred.labels.tolist() == [-1, 4] and pred.errors[0].startswith("bad response: label")
    with pytest.raises(ValueError, match="score columns"):
        parse_output(np.zeros((1, MAX_LABEL + 2), np.float32), 1)
    # a non-finite score fails its own row only; the others keep their answer, as a distribution or softmaxed
    for rows, dist in (([[0.1, 0.9], [np.nan, 0.5], [0.7, 0.3], [np.inf, 0.0]], True),
                       ([[1.0, 3.0], [-np.inf, 2.0], [4.0, 0.0], [np.nan, np.nan]], False)):
        pred = parse_output(np.array(rows, np.float32), 4)
        assert pred.labels.tolist() == [1, -1, 0, -1] and pred.failed.tolist() == [False, True, False, True]
        assert pred.retryable.tolist() == [False, True, False, True] and "NaN or inf" in pred.errors[1]
        assert np.allclose(pred.scores[[0, 2]].sum(1), 1) and np.isnan(pred.scores[[1, 3]]).all()
        assert np.allclose(pred.scores[0], [0.1, 0.9]) == dist


def test_scores_in_one_request_bare_labels_in_another_give_one_consistent_prediction(crafted_v2_server):
    # Request 0 answers (n, 10) scores, request 1 bare labels, one of them past the 10 classes of the others.
    def respond(i: int, n: int, h) -> None:
        if i == 0:
            send_raw(h, 200, v2_answer(np.eye(10, dtype=np.float32)[np.arange(n) % 10], [n, 10]))
        else:
            send_raw(h, 200, v2_answer([57, 4][:n], [n], "INT64"))

    srv = crafted_v2_server(respond)
    with open_blackbox(srv.url, SPEC, **_quick(max_batch_size=2, max_concurrency=1)) as bb:
        pred = bb.predict(_images(4))
        stats = bb.stats()
    assert pred.scores is not None and pred.scores.shape == (4, 10)
    assert pred.labels.tolist() == [0, 1, -1, 4]
    assert pred.errors[2] == "bad response: label 57 outside the 10 classes of the other answers"
    assert np.isnan(pred.scores[3]).all(), "a bare label has no score"
    # what the query stage does with a prediction: index the scores by label (was an IndexError)
    top = pred.scores[np.arange(4), np.maximum(pred.labels, 0)]
    assert top[:2].tolist() == [1.0, 1.0]
    assert stats["failures"] == 1 and stats["ok"] == 3
    assert Prediction.concat([pred]).labels.tolist() == pred.labels.tolist()


def _parquet_with_null_keys(path, key_type: pa.DataType) -> dict:
    pngs = [_png(Image.fromarray(np.full((28, 28), 10 * i, np.uint8))) for i in range(5)]
    keys = ["a", None, "c", None, "e"] if pa.types.is_string(key_type) else [10, None, 30, None, 50]
    pq.write_table(pa.table({"image": pa.array(pngs, pa.binary()), "id": pa.array(keys, key_type),
                             "label": pa.array([1, 2, 3, 4, 5], pa.int64())}), path)
    return dict(zip(range(5), keys, strict=True))


@pytest.mark.parametrize("key_type", [pa.string(), pa.int32()])
def test_null_parquet_key_is_an_error_row_not_a_failed_block(ray_local, tmp_path, key_type):
    (tmp_path / "src").mkdir()
    _parquet_with_null_keys(tmp_path / "src" / "s.parquet", key_type)
    spec = SourceSpec(uri=str(tmp_path / "src"), key_column="id")
    rows = _rows(read_source(spec))
    assert len(rows) == 5 and len({r["key"] for r in rows}) == 5, "every row, each with its own key"
    missing = [r for r in rows if r["error"] is not None]
    assert len(missing) == 2 and all(r["error"] == "missing key (column 'id' is null)" for r in missing)
    assert all(r["id"] is not None for r in rows), "the resume id of a keyless row is a stand-in, never null"
    # decode keeps the reason, and the sink (which raised on a null key) writes the rows
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in ("key", "shard", "image_bytes", "error")}
    batch["label"] = np.array([r["label"] for r in rows])
    batch["id"] = np.array([r["id"] for r in rows])
    out = decode_batch(batch, 28, 1)
    table = to_output_batch(out, method="none", id_column="id")
    assert table.num_rows == 5 and table["error"].null_count == 3


def _tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shard_with_non_contiguous_members_gives_error_rows(ray_local, tmp_path):
    png = _png(Image.fromarray(np.full((28, 28), 99, np.uint8)))
    root = tmp_path / "wds"
    root.mkdir()
    _tar(root / "shard-0.tar", [("a.png", png), ("a.cls", b"1"), ("b.png", png), ("b.cls", b"2")])
    # the second shard breaks the WebDataset convention: c's label comes after d (Ray's reader raised here)
    _tar(root / "shard-1.tar", [("c.png", png), ("d.png", png), ("d.cls", b"4"), ("c.cls", b"3")])
    rows = _rows(read_source(SourceSpec(uri=str(root), format="webdataset")))
    keys = sorted(r["key"] for r in rows)
    assert keys == ["shard-0.tar/a", "shard-0.tar/b", "shard-1.tar/c", "shard-1.tar/c~2", "shard-1.tar/d"]
    errors = {r["key"]: r["error"] for r in rows}
    assert errors["shard-1.tar/c~2"].startswith("members of sample 'c' are not contiguous")
    assert [errors[k] for k in ("shard-0.tar/a", "shard-0.tar/b", "shard-1.tar/c", "shard-1.tar/d")] == [None] * 4
    assert len({r["sample_id"] for r in rows}) == 5, "resume ids stay unique"


def test_webdataset_shard_cut_short_ends_with_an_error_row(ray_local, tmp_path):
    png = _png(Image.fromarray(np.full((28, 28), 7, np.uint8)))
    root = tmp_path / "wds"
    root.mkdir()
    _tar(root / "whole.tar", [("a.png", png)])
    _tar(tmp_path / "full.tar", [("b.png", png), ("c.png", png * 20)])
    data = (tmp_path / "full.tar").read_bytes()
    padded = -(-len(png) // 512) * 512
    (root / "short.tar").write_bytes(data[: 512 + padded + 512 + 200])  # c's data stops after 200 bytes
    rows = {r["key"]: r["error"] for r in _rows(read_source(SourceSpec(uri=str(root), format="webdataset")))}
    assert rows.pop("whole.tar/a") is None and rows.pop("short.tar/b") is None
    assert rows == {"short.tar/c": "shard unreadable after 2 samples (ReadError)",
                    "short.tar/~unreadable": "shard unreadable after 2 samples (ReadError)"}


def test_a_file_gone_between_listing_and_reading_is_one_error_row(ray_local, tmp_path):
    # Deleted after the plan listed it (also what a file we may not read looks like, but tests may run as root).
    png = _png(Image.fromarray(np.full((28, 28), 5, np.uint8)))
    folder = tmp_path / "folder" / "cat"
    folder.mkdir(parents=True)
    for name in ("a.png", "gone.png"):
        (folder / name).write_bytes(png)
    ds = read_source(SourceSpec(uri=str(tmp_path / "folder"), format="imagefolder"))
    (folder / "gone.png").unlink()
    rows = {r["key"]: r for r in _rows(ds)}
    assert rows["cat/a.png"]["error"] is None and rows["cat/a.png"]["image_bytes"] == png
    assert rows["cat/gone.png"]["error"] == "file cannot be opened (FileNotFoundError)"
    assert rows["cat/gone.png"]["image_bytes"] is None and rows["cat/gone.png"]["label"] == 0

    root = tmp_path / "wds"
    root.mkdir()
    _tar(root / "kept.tar", [("a.png", png)])
    _tar(root / "gone.tar", [("b.png", png)])
    ds = read_source(SourceSpec(uri=str(root), format="webdataset"))
    (root / "gone.tar").unlink()
    rows = {r["key"]: r["error"] for r in _rows(ds)}
    assert rows == {"kept.tar/a": None, "gone.tar/~unreadable": "shard cannot be opened (FileNotFoundError)"}


def test_names_that_are_not_utf8_are_read_or_refused_by_name(ray_local, tmp_path):
    png = _png(Image.fromarray(np.full((28, 28), 9, np.uint8)))
    root = tmp_path / "wds"
    root.mkdir()
    # tarfile keeps the byte 0xE9 of a member name as the lone surrogate U+DCE9, which Arrow cannot hold
    with tarfile.open(root / "s.tar", "w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tar:
        for name, data in (("a.png", png), ("b\udce9.png", png), ("b\udce9.cls", b"3"), ("c.png", png)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rows = {r["key"]: r for r in _rows(read_source(SourceSpec(uri=str(root), format="webdataset")))}
    assert sorted(rows) == ["s.tar/a", "s.tar/b\\xe9", "s.tar/c"]
    assert rows["s.tar/b\\xe9"]["error"] is None and rows["s.tar/b\\xe9"]["image_bytes"] == png
    assert rows["s.tar/b\\xe9"]["label"] == 3 and rows["s.tar/b\\xe9"]["sample_id"].endswith("s.tar/b\\xe9")

    # Arrow cannot even list a file whose name is not UTF-8: refused before the read, naming it
    folder = tmp_path / "folder"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "a.png").write_bytes(png)
    with open(bytes(folder / "cat") + b"/b\xe9.png", "wb") as f:
        f.write(png)
    with pytest.raises(SourceError, match=r"is not UTF-8 text: .*cat/b\\xe9\.png; rename it"):
        read_source(SourceSpec(uri=str(folder), format="imagefolder"))
    with pytest.raises(SourceError, match=r"is not UTF-8 text: .*cat/b\\xe9\.png; rename it"):
        read_source(SourceSpec(uri=str(folder), format="parquet"))


# ---------------------------------------------------------------------------------------------------------------
# 5. Every size and time the input controls is bounded before the work.


@pytest.mark.parametrize("make", [
    lambda: _png(Image.new("I;16", (6000, 6000))),  # 16-bit greyscale: ~70 KB on disk, 216 MB to decode
    lambda: _tiff_int32(5000),  # 32-bit integer TIFF, compressed
], ids=["png16", "tiff32"])
def test_decode_cost_is_bounded_from_the_header(make) -> None:
    data = make()
    assert len(data) < 2_000_000
    arr, err = decode_image(data, 28, 1)
    assert arr is None and err.startswith("image too large") and "MiB to decode" in err
    # the same header under a larger budget decodes: the bound is what refused it
    small, err = decode_image(data, 28, 1, max_decoded_bytes=1 << 31)
    assert err is None and small.shape == (1, 28, 28)


def _tiff_int32(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("I", (side, side)).save(buf, format="TIFF", compression="tiff_adobe_deflate")
    return buf.getvalue()


def test_parquet_cell_past_the_bound_is_an_error_row(ray_local, tmp_path):
    # 8 MiB of zeros compresses to almost nothing with zstd
    root = tmp_path / "pq"
    root.mkdir()
    ok = _png(Image.fromarray(np.zeros((28, 28), np.uint8)))
    pq.write_table(pa.table({"image": pa.array([ok, b"\0" * (8 << 20)], pa.binary()), "key": ["ok", "bomb"]}),
                   root / "s.parquet", compression="zstd")
    assert (root / "s.parquet").stat().st_size < 100_000
    rows = {r["key"]: r for r in _rows(read_source(SourceSpec(uri=str(root), max_image_bytes=1 << 20)))}
    assert rows["ok"]["error"] is None and rows["ok"]["image_bytes"] == ok
    assert rows["bomb"]["error"] == f"image too large ({8 << 20} bytes > {1 << 20})"
    assert rows["bomb"]["image_bytes"] is None, "the bytes go no further than the read"


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar makes the sparse member")
def test_sparse_tar_member_is_refused_before_it_is_read(ray_local, tmp_path):
    src, root = tmp_path / "members", tmp_path / "wds"
    src.mkdir()
    root.mkdir()
    (src / "a.png").write_bytes(_png(Image.fromarray(np.zeros((28, 28), np.uint8))))
    with open(src / "b.png", "wb") as f:
        f.truncate(256 << 20)  # 256 MiB of holes
    subprocess.run(["tar", "--sparse", "-cf", str(root / "s.tar"), "-C", str(src), "a.png", "b.png"], check=True)
    assert (root / "s.tar").stat().st_size < 100_000
    rows = {r["key"]: r for r in _rows(read_source(SourceSpec(uri=str(root), format="webdataset",
                                                              max_image_bytes=1 << 20)))}
    assert rows["s.tar/a"]["error"] is None and rows["s.tar/a"]["image_bytes"]
    assert rows["s.tar/b"]["error"] == f"image too large (member png: {256 << 20} bytes > {1 << 20})"
    assert rows["s.tar/b"]["image_bytes"] is None


def test_gzip_bomb_response_is_cut_at_the_cap(crafted_v2_server):
    # valid JSON, 100 MB of it padding: 0.1 MB on the wire
    def respond(i: int, n: int, h) -> None:
        body = v2_answer(np.arange(n) % 10, [n], "INT64")
        send_raw(h, 200, gzip.compress(body[:-1] + b" " * 100_000_000 + b"}", 9), {"Content-Encoding": "gzip"})

    srv = crafted_v2_server(respond)
    with open_blackbox(srv.url, SPEC, **_quick(max_response_bytes=1 << 20)) as bb:
        pred = bb.predict(_images(3))
    assert pred.failed.all() and pred.errors[0].startswith(f"bad response: response larger than {1 << 20} bytes")
    # the same answer without padding is read through the same path
    srv2 = crafted_v2_server(lambda i, n, h: send_raw(h, 200, gzip.compress(v2_answer([1] * n, [n], "INT64")),
                                                      {"Content-Encoding": "gzip"}))
    with open_blackbox(srv2.url, SPEC, **_quick()) as bb:
        assert bb.predict(_images(3)).labels.tolist() == [1, 1, 1]


def test_default_response_cap_holds_without_options(crafted_v2_server):
    srv = crafted_v2_server(lambda i, n, h: send_raw(h, 200, b'{"outputs": [' + b" " * (40 << 20) + b"]}"))
    with open_blackbox(srv.url, SPEC, **_quick()) as bb:
        pred = bb.predict(_images(1))
    assert pred.errors[0].startswith("bad response: response larger than")


def test_timeout_is_a_deadline_for_a_trickled_answer(crafted_v2_server):
    # slow loris: every byte arrives well within the per-read timeout, the whole answer takes 8 s
    def respond(i: int, n: int, h) -> None:
        body = v2_answer([1] * n, [n], "INT64")
        send_raw(h, 200, [(body[j:j + 1], 0.25 if j < 32 else 0.0) for j in range(len(body))])

    srv = crafted_v2_server(respond)
    with open_blackbox(srv.url, SPEC, **_quick(timeout_s=1.0)) as bb:
        t0 = time.monotonic()
        pred = bb.predict(_images(2))
        took = time.monotonic() - t0
    assert pred.errors == ["timeout after 1 try"] * 2 and pred.retryable.all()
    assert took < 5, f"the request ran {took:.1f}s past a 1 s deadline (the whole answer takes 8 s)"


@pytest.mark.parametrize("override", [
    "resources.query_actors=100000", "resources.purify_actors=100000", "blackbox.size=1000000",
    "blackbox.rate_limit_qps=0", "blackbox.timeout_s=.inf", "blackbox.timeout_s=.nan", "blackbox.retries=1000",
    "resources.query_batch_size=100000000", "blackbox.max_concurrency=100000", "resources.decode_cpus=.inf",
    "source.max_image_bytes=100000000000", "blackbox.query_budget=-1",
    "resources.gpus_per_actor=1.5",  # Ray refuses it only after the probe and the gate's queries were billed
    "resources.gpus_per_actor=2",  # one model on two GPUs: half of them idle
    "model.device=gpu",
])
def test_config_values_have_sane_ranges(override: str) -> None:
    with pytest.raises(ValueError, match="invalid config"):
        load_config(None, [override])


def test_config_in_range_values_still_load() -> None:
    cfg = load_config(None, ["blackbox.rate_limit_qps=5", "blackbox.timeout_s=2.5", "resources.query_actors=8"])
    assert cfg.blackbox.rate_limit_qps == 5 and cfg.resources.query_actors == 8
    assert load_config(None, ["blackbox.rate_limit_qps=null"]).blackbox.rate_limit_qps is None
    # what the source's own messages advise for a column that is not a key: file:row keys, no labels
    plain = load_config(None, ["source.key_column=null", "source.label_column=null"]).source
    assert plain.key_column is None and plain.label_column is None
    # A dated path reads as a date in YAML: the message says to quote it, and quoted it loads.
    with pytest.raises(ValueError, match=r"output.uri: Input should be a valid string \(YAML reads .* quote it"):
        load_config(None, ["output.uri=2024-05-01"])
    assert load_config(None, ["output.uri='2024-05-01'"]).output.uri == "2024-05-01"


def test_a_pool_whose_bound_is_below_its_size_is_refused_before_any_work() -> None:
    with pytest.raises(ValueError, match=r"max_purify_actors \(2\) must be at least purify_actors \(4\)"):
        load_config(None, ["resources.purify_actors=4", "resources.max_purify_actors=2"])
    assert load_config(None, ["resources.purify_actors=2", "resources.max_purify_actors=2"]).resources


def test_clients_refuse_unbounded_numbers_too() -> None:
    for bad in ({"rate_limit_qps": 0}, {"timeout_s": float("inf")}, {"rate_limit_qps": float("nan")}):
        with pytest.raises(ValueError):
            open_blackbox("v2+http://127.0.0.1:9/models/m", SPEC, **bad)


# ---------------------------------------------------------------------------------------------------------------
# 6. Secrets: redacted before any cut, refused when malformed, never echoed from a URI.


def test_token_echoed_at_the_cut_is_redacted_whole(crafted_v2_server, monkeypatch):
    monkeypatch.setenv("BB_TOKEN", TOKEN)
    # the server echoes the token so that it straddles the old 200-character cut
    srv = crafted_v2_server(lambda i, n, h: send_raw(
        h, 403, json.dumps({"error": "x" * 170 + f" you sent Bearer {TOKEN} which we refuse"}).encode()))
    with open_blackbox(srv.url, SPEC, auth_env="BB_TOKEN", **_quick()) as bb:
        pred = bb.predict(_images(1))
    err = pred.errors[0]
    assert err.startswith("http 403") and "***" in err
    for piece in (TOKEN[:6], TOKEN[-6:], TOKEN[5:11]):
        assert piece not in err, err


def test_token_echoed_escaped_is_redacted_too(crafted_v2_server, monkeypatch):
    token = 'tok/with"quote+plus'
    monkeypatch.setenv("BB_TOKEN", token)
    # json.dumps escapes the quote; the query-string form is percent-encoded
    echo = json.dumps({"error": f"json {token} url {quote(token, safe='')}"})
    srv = crafted_v2_server(lambda i, n, h: send_raw(h, 401, echo.encode()))
    with open_blackbox(srv.url, SPEC, auth_env="BB_TOKEN", **_quick()) as bb:
        err = bb.predict(_images(1)).errors[0]
    assert "with" not in err and "quote" not in err and err.count("***") == 2, err


@pytest.mark.parametrize("value", [TOKEN + "\r", "\n" + TOKEN, TOKEN[:8] + "\r\nX-Evil: 1" + TOKEN[8:], " " + TOKEN])
def test_token_with_control_characters_is_refused_naming_the_variable(value, monkeypatch):
    monkeypatch.setenv("BB_TOKEN", value)
    with pytest.raises(ValueError) as ei:
        open_blackbox("v2+http://127.0.0.1:9/models/m", SPEC, auth_env="BB_TOKEN")
    assert "BB_TOKEN" in str(ei.value) and TOKEN[:8] not in str(ei.value) and TOKEN[-8:] not in str(ei.value)


@pytest.mark.parametrize("uri", ["s3://AKIAKEY:SeCrEt/Pa+ss@bucket/prefix", "s3://AKIAKEY:SeCrEtPass@bucket/p",
                                 "gs://user:SeCrEtPass@bucket/p"])
def test_credentials_inside_a_storage_uri_never_appear(uri):
    with pytest.raises(StorageError) as ei:
        resolve_filesystem(uri)
    assert "SeCrEt" not in str(ei.value) and "credentials" in str(ei.value)
    assert ei.value.__cause__ is None or "SeCrEt" not in str(ei.value.__cause__)


@pytest.mark.parametrize("uri", [
    "https://b.s3.amazonaws.com/k.parquet?X-Amz-Credential=AKIAKEY&X-Amz-Security-Token=SeCrEtTok"
    "&X-Amz-Signature=SeCrEtSig",
    "https://acct.blob.core.windows.net/c/k.parquet?sv=2022&sig=SeCrEtSas"])
def test_a_presigned_or_sas_url_as_storage_uri_never_echoes_its_signature(uri):
    with pytest.raises(StorageError) as ei:
        resolve_filesystem(uri)
    assert "SeCrEt" not in str(ei.value) and "AKIAKEY" not in str(ei.value) and "unsupported URI" in str(ei.value)
    assert ei.value.__cause__ is None


def test_credentials_inside_an_endpoint_url_never_appear():
    with pytest.raises(StorageError) as ei:
        resolve_filesystem("s3://bucket/p", endpoint_url="http://minio:SeCrEtPw@127.0.0.1:9")
    assert "SeCrEt" not in str(ei.value)
    # a filesystem built elsewhere with such an endpoint: describe() masks it
    fs = pafs.S3FileSystem(endpoint_override="minio:SeCrEtPw@127.0.0.1:9", scheme="http", region="us-east-1")
    where = describe(fs, "bucket/p")
    assert "SeCrEt" not in where and where.startswith("s3://bucket/p at http://***@127.0.0.1:9")
    assert "SeCrEt" not in str(StorageError(f"cannot reach http://minio:SeCrEtPw@host/ ({where})"))


@pytest.mark.parametrize("overrides", [
    ["source=s3://AKIAKEY:SeCrEtPass@bucket/p"],  # a section given a URI (".uri" forgotten)
    ["source.uri=s3://AKIAKEY:SeCrEtPass@bucket/p", "blackbox.uri=v2+http://127.0.0.1:9/models/m",
     "resources.query_actors=9", "blackbox.max_concurrency=2"],  # a cross-field check prints the config
    ["blackbox.headers={Authorization: Bearer SeCrEtTok}"],  # an unknown key whose value is a secret
    ["blackbox.auth_env=eyJSeCrEt.payload.sig"],  # a token pasted where the name of its env var goes
    ["blackbox.header_env={X-Api-Key: sk-SeCrEt-1}"],
    ["purify.params={t_start: SeCrEt, steps: [1"],  # not YAML at all
])
def test_config_errors_name_the_field_never_the_value(overrides):
    with pytest.raises(ValueError) as ei:
        load_config(None, overrides)
    message = str(ei.value)
    assert "SeCrEt" not in message and ei.value.__cause__ is None, message
    assert message.startswith(("invalid config: ", "override 'purify.params': its value is not valid YAML")), message


@pytest.mark.parametrize("uri,path", [
    ("s3://bucket/run#1/x?y/", "bucket/run#1/x?y"),  # "#" and "?" are part of an S3 key, not a URL's fragment
    ("gs://bucket/a#1/b", "bucket/a#1/b"),
    ("hdfs://namenode:8020/data/", "/data"),  # the path the HDFS filesystem takes
    ("abfs://container@acct.dfs.core.windows.net/a/b", "container/a/b"),  # "@" names the container here
    ("file:///tmp/a#b", "/tmp/a#b"),
])
def test_uri_paths_keep_every_character_of_the_key(uri, path):
    from pipeline.storage import uri_path

    assert uri_path(uri) == path
    if uri.startswith("gs://"):  # pyarrow's own parse would cut the key at "#"
        assert resolve_filesystem(uri)[1] == path


@pytest.mark.parametrize("inside", ["output", "source"])
def test_an_output_inside_the_source_or_around_it_is_refused_before_any_work(tmp_path, inside):
    """A rerun would list its own output files as source shards: every key would repeat, and the rows already
    written would come back as duplicate-key errors."""
    from pipeline.job import preflight
    from pipeline.storage import overlap
    from tests.plugins.s3 import make_fmnist_shards

    data = tmp_path / "data"
    src = make_fmnist_shards(pafs.LocalFileSystem(), str(data / "shards"), 1, 4, "parquet")
    out = data / "shards" / "zz-clean" if inside == "output" else tmp_path
    with pytest.raises(StorageError, match="overlap"):
        preflight(load_config(None, [f"source.uri={src.uri}", f"output.uri={out}"]))
    assert not (data / "shards" / "zz-clean").exists()
    preflight(load_config(None, [f"source.uri={src.uri}", f"output.uri={data / 'clean'}"]))  # beside it: fine
    with pytest.raises(ValueError, match="cuda:0"):  # what a purify actor sees of the GPU Ray gives it
        preflight(load_config(None, [f"source.uri={src.uri}", f"output.uri={data / 'clean'}", "model.device=cuda:1"]))
    a = pafs.S3FileSystem(endpoint_override="127.0.0.1:9000", scheme="http", anonymous=True)
    b = pafs.S3FileSystem(endpoint_override="127.0.0.1:9001", scheme="http", anonymous=True)
    assert overlap(a, "bucket/in/", a, "bucket/in/out") and overlap(a, "bucket/in", a, "bucket/in")
    assert not overlap(a, "bucket/in", a, "bucket/in-clean")  # a shared prefix is not a folder
    assert not overlap(a, "bucket/in", b, "bucket/in/out")  # another server's bucket
    assert not overlap(a, "bucket/in", pafs.LocalFileSystem(), "bucket/in/out")


# ---------------------------------------------------------------------------------------------------------------
# 7. EXIF orientation.


def test_exif_orientation_is_applied() -> None:
    # stored 3 wide x 1 high; orientation 6 says "rotate 90 degrees clockwise to view": upright it is 1 x 3, the
    # left pixel on top
    img = Image.fromarray(np.array([[255, 128, 0]], np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    arr, err = decode_image(_png(img, exif=exif), 3, 1, "pad")
    assert err is None
    upright = np.zeros((3, 3), np.uint8)
    upright[:, 1] = [255, 128, 0]  # centred in the 3x3 pad
    assert arr[0].tolist() == upright.tolist()
    # without the tag the same pixels stay as stored
    arr, _ = decode_image(_png(img), 3, 1, "pad")
    assert arr[0, 1].tolist() == [255, 128, 0]


# ---------------------------------------------------------------------------------------------------------------
# The preflight probe: /infer with the configured credentials, outside the budget.


def test_probe_proves_infer_with_the_credentials(crafted_v2_server, monkeypatch):
    srv = crafted_v2_server(lambda i, n, h: send_raw(h, 200, v2_answer([3] * n, [n], "INT64")),
                            require_headers={"Authorization": f"Bearer {TOKEN}"})
    monkeypatch.setenv("BB_TOKEN", "wrong-token-123456")
    with open_blackbox(srv.url, SPEC, auth_env="BB_TOKEN", **_quick()) as bb:
        bb.check()  # the ready endpoints need no credentials: check() alone cannot tell
        with pytest.raises(BlackBoxUnavailable) as ei:
            bb.probe()
    msg = str(ei.value)
    assert "http 401" in msg and "$BB_TOKEN" in msg and "wrong-token" not in msg
    monkeypatch.setenv("BB_TOKEN", TOKEN)
    with open_blackbox(srv.url, SPEC, auth_env="BB_TOKEN", query_budget=0, **_quick()) as bb:
        bb.probe()
        assert bb.stats()["budget_left"] == 0 and bb.stats()["rows"] == 0, "the probe is not a query"
    assert srv.requests == 1, "one tiny request"


def test_probe_refuses_an_unusable_answer(crafted_v2_server):
    srv = crafted_v2_server(lambda i, n, h: send_raw(h, 200, v2_answer([-4] * n, [n], "INT64")))
    with open_blackbox(srv.url, SPEC, **_quick()) as bb, pytest.raises(BlackBoxUnavailable, match="label -4"):
        bb.probe()


def test_onnx_probe(victim_onnx, tmp_path):
    with open_blackbox(f"onnx:{victim_onnx}", SPEC, query_budget=0) as bb:
        bb.probe()
        assert bb.stats()["rows"] == 0
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(BlackBoxUnavailable):
        open_blackbox(f"onnx:{bad}", SPEC).probe()


@pytest.mark.parametrize("key_type", [pa.string(), pa.int64()])
def test_null_keys_through_a_job_and_its_resume(ray_local, tmp_path, key_type):
    """The whole job: null-key rows are error rows; a rerun finds them done (a data error, not a transient one),
    so the output holds every row exactly once after both runs."""
    from pipeline.job import run_sanitize

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    _parquet_with_null_keys(src / "s.parquet", key_type)
    cfg = load_config(overrides=[f"source.uri={src}", f"output.uri={out}", "source.key_column=id",
                                 "purify.method=none", "resources.query_batch_size=8"])
    first = run_sanitize(cfg)
    second = run_sanitize(cfg)
    table = pq.ParquetDataset(str(out)).read()
    keys = table["key"].to_pylist()
    assert first.rows_this_run == 5 and second.rows_this_run == 0, (first, second)
    assert len(keys) == len(set(keys)) == 5
    errors = [e for e in table["error"].to_pylist() if e is not None]
    assert errors == ["missing key (column 'id' is null)"] * 2
    assert table["id"].null_count == 0


def test_sagemaker_probe_and_response_cap() -> None:
    """SageMaker through botocore's Stubber (the AWS API is stubbed, our client is not)."""
    import boto3
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    rt = boto3.client("sagemaker-runtime", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    bb = open_blackbox("sagemaker:ep", SPEC, client=rt, max_response_bytes=1000, **_quick())
    ok = v2_answer([2], [1], "INT64")
    big = v2_answer([2] * 300, [300], "INT64")
    with Stubber(rt) as stub:
        stub.add_client_error("invoke_endpoint", "UnrecognizedClientException", "The security token is invalid", 403)
        stub.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(ok), len(ok))})
        stub.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(big), len(big))})
        with pytest.raises(BlackBoxUnavailable, match=r"refused the AWS credentials .*\(http 403\)"):
            bb.probe()
        bb.probe()
        pred = bb.predict(_images(1))
        stub.assert_no_pending_responses()
    assert len(pred.errors) == 1 and pred.errors[0].startswith("bad response: response larger than 1000 bytes")
    assert bb.stats()["rows"] == 1, "probes are not queries"


def test_sagemaker_timeout_is_a_deadline_for_a_trickled_answer(crafted_v2_server, monkeypatch):
    """botocore bounds each read; a trickled invocation answer must still end at timeout_s (a real local server)."""
    def respond(i: int, n: int, h) -> None:
        body = v2_answer([1] * n, [n], "INT64")
        send_raw(h, 200, [(body[j:j + 1], 0.25 if j < 32 else 0.0) for j in range(len(body))])

    srv = crafted_v2_server(respond)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    with open_blackbox("sagemaker:ep", SPEC, endpoint_url=srv.base_url, region_name="us-east-1",
                       **_quick(timeout_s=1.0)) as bb:
        t0 = time.monotonic()
        pred = bb.predict(_images(2))
        took = time.monotonic() - t0
    assert pred.errors == ["timeout after 1 try"] * 2 and pred.retryable.all()
    assert took < 5, f"the request ran {took:.1f}s past a 1 s deadline (the whole answer takes 8 s)"
    assert srv.requests == 1


def test_imagefolder_file_past_the_bound_is_not_read_whole(ray_local, tmp_path):
    root = tmp_path / "folder" / "cat"
    root.mkdir(parents=True)
    ok = _png(Image.fromarray(np.zeros((28, 28), np.uint8)))
    (root / "ok.png").write_bytes(ok)
    (root / "huge.png").write_bytes(ok + b"\0" * (3 << 20))
    rows = {r["key"]: r for r in _rows(read_source(SourceSpec(uri=str(tmp_path / "folder"), format="imagefolder",
                                                              max_image_bytes=1 << 20)))}
    assert rows["cat/ok.png"]["error"] is None and rows["cat/ok.png"]["image_bytes"] == ok
    assert rows["cat/huge.png"]["error"] == f"image too large (file past {1 << 20} bytes)"
    assert rows["cat/huge.png"]["image_bytes"] is None and rows["cat/huge.png"]["label"] == 0
