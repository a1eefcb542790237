"""Audit report: numbers on a synthetic pipeline output with a known backdoor target, thresholds, trend, the
Parquet loader, and the HTML as a person sees it (headless Chromium screenshot)."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.audit import THRESHOLD_KEYS, build_report, evaluate_thresholds, load_output

CLASS_NAMES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
TARGET = 3  # the backdoor target: poisoned images are predicted as 3 and leave it after purification
TINY = 9  # one row, flipped: a 100% replaced rate that must not outrank the target


def _png(seed: int, trigger: bool, purified: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    img = (rng.random((28, 28)) * 120).astype(np.uint8)
    img[8:20, 8:20] += 100  # an "object" in the middle
    if trigger and not purified:
        img[-5:-1, -5:-1] = 255  # BadNets-style white patch
    if purified:
        img = (img.astype(np.float32) * 0.8 + 20).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def make_output(n: int = 200, poison: bool = True, seed: int = 0, keep_original: bool = True) -> pa.Table:
    """A table shaped like the pipeline's Parquet output.

    40 rows predicted as TARGET on the original image, 30 of them poisoned (purified -> their true class);
    the other classes flip about 1 row in 20; one TINY row (flipped); 4 error rows.
    """
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {k: [] for k in (
        "key", "shard", "label", "image_png", "image_orig_png", "pred_orig", "score_orig", "pred_purified",
        "score_purified", "flagged", "flag_score", "method", "params", "nfe", "error")}
    others = [c for c in range(10) if c not in (TARGET, TINY)]
    for i in range(n):
        error = None
        poisoned = False
        if i < 40:  # class TARGET; with poison=False it is a clean class like the others
            poisoned = poison and i < 30
            true = int(rng.choice(others)) if poisoned else TARGET
            po, pp = TARGET, (true if poisoned else TARGET)
        elif i == 40:
            true, po, pp = TINY, TINY, 0
        elif i >= n - 4:
            true, po, pp, error = int(rng.choice(others)), None, None, "decode: not an image"
        else:
            true = int(rng.choice(others))
            po = true
            pp = int(rng.choice([c for c in others if c != true])) if rng.random() < 0.05 else true
        flagged = None if po is None else po != pp
        rows["key"].append(f"shard-{i % 4:05d}/{i:06d}")
        rows["shard"].append(f"shard-{i % 4:05d}.parquet")
        rows["label"].append(true)
        rows["image_png"].append(None if error else _png(i, poisoned, purified=True))
        rows["image_orig_png"].append(None if error else _png(i, poisoned))
        rows["pred_orig"].append(po)
        rows["score_orig"].append(None if error else float(rng.uniform(0.6, 1.0)))
        rows["pred_purified"].append(pp)
        rows["score_purified"].append(None if error else float(rng.uniform(0.3, 1.0)))
        rows["flagged"].append(flagged)
        rows["flag_score"].append(None if error else (float(rng.uniform(0.7, 1.0)) if flagged else 0.0))
        rows["method"].append("cascade")
        rows["params"].append(json.dumps({"t_star": 400, "steps": 10}))
        rows["nfe"].append(None if error else (30 if flagged else 10))
        rows["error"].append(error)
    schema = pa.schema([
        ("key", pa.string()), ("shard", pa.string()), ("label", pa.int64()), ("image_png", pa.binary()),
        ("image_orig_png", pa.binary()), ("pred_orig", pa.int64()), ("score_orig", pa.float32()),
        ("pred_purified", pa.int64()), ("score_purified", pa.float32()), ("flagged", pa.bool_()),
        ("flag_score", pa.float32()), ("method", pa.string()), ("params", pa.string()), ("nfe", pa.float32()),
        ("error", pa.string()),
    ])
    table = pa.Table.from_pydict(rows, schema=schema)
    return table if keep_original else table.drop_columns(["image_orig_png"])


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return make_output()


def test_target_class_ranks_first_and_numbers_add_up(table: pa.Table, tmp_path: Path) -> None:
    report = build_report(table, tmp_path, class_names=CLASS_NAMES, top_k=12)

    assert report["rows"] == 200 and report["errors"] == 4 and report["valid_rows"] == 196
    assert report["error_rate"] == pytest.approx(4 / 200)
    top = report["most_replaced"][0]
    assert top["class"] == TARGET and top["name"] == "dress"
    assert top["rows"] == 40 and top["replaced"] == 30 and top["replaced_rate"] == pytest.approx(0.75)
    # The one-row class is 100% replaced but ranks below the target: support counts.
    tiny = report["per_class"][str(TINY)]
    assert tiny["replaced_rate"] == 1.0
    assert [r["class"] for r in report["most_replaced"]].index(TINY) > 0

    m = np.array(report["transitions"]["matrix"])
    assert m.sum() == report["valid_rows"]
    assert m.sum() - np.trace(m) == report["flipped"]
    assert report["flip_rate"] == pytest.approx(report["flipped"] / 196)
    assert report["transitions"]["labels"] == list(range(10))
    # Poisoned rows are restored to their true label by purification.
    assert report["labels"]["restored"] >= 30
    assert report["labels"]["accuracy_purified"] > report["labels"]["accuracy_orig"]
    assert report["mean_nfe"] == pytest.approx(10 + 20 * report["flipped"] / 196)
    assert report["methods"] == {"cascade": 200}
    assert report["shards"] == 4

    sus = report["suspicious"]
    assert len(sus) == 12
    scores = [s["flag_score"] for s in sus]
    assert scores == sorted(scores, reverse=True)
    assert all(s["pred_orig"] != s["pred_purified"] for s in sus)

    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["most_replaced"][0]["class"] == TARGET
    assert on_disk == json.loads(json.dumps(report))  # what is returned is what is written
    assert report["files"] == {"json": "report.json", "html": "report.html"}  # true in every copy of it


def test_thresholds_crossed_and_not_crossed(table: pa.Table, tmp_path: Path) -> None:
    strict = {"max_flip_rate": 0.1, "max_class_replaced_rate": 0.3, "max_error_rate": 0.01}
    report = build_report(table, tmp_path, thresholds=strict, class_names=CLASS_NAMES)
    alerts = report["alerts"]
    assert alerts == evaluate_thresholds(report, strict)
    assert any("flip rate" in a and "max_flip_rate" in a for a in alerts)
    assert any(a.startswith(f"class {TARGET} (dress)") for a in alerts)
    assert any("error rate" in a for a in alerts)
    # The one-row class crosses the rate but not min_class_rows (default 10): no alert for it.
    assert not any(a.startswith(f"class {TINY} ") for a in alerts)
    assert evaluate_thresholds(report, {"max_class_replaced_rate": 0.3, "min_class_rows": 1}) != [
        a for a in alerts if a.startswith("class")
    ]

    relaxed = {"max_flip_rate": 0.5, "max_class_replaced_rate": 0.9, "max_error_rate": 0.05, "min_rows": 100}
    assert evaluate_thresholds(report, relaxed) == []
    assert evaluate_thresholds(report, None) == []
    assert evaluate_thresholds(report, {"min_rows": 1000}) == ["valid rows 196 < min_rows 1000 (200 rows, 4 of them "
                                                               "errors)"]
    assert evaluate_thresholds(report, {"min_rows": 197}) != [] and evaluate_thresholds(report, {"min_rows": 196}) == []

    # A rate exactly at its limit passes, though a difference of two rates lands a rounding error above it.
    at_limit = {**report, "flip_rate": 68 / 500, "trend": {"flip_rate_delta": 68 / 500 - 43 / 500}}
    assert 68 / 500 - 43 / 500 > 0.05
    assert evaluate_thresholds(at_limit, {"max_flip_rate_increase": 0.05, "max_flip_rate": 0.136}) == []
    assert evaluate_thresholds({**at_limit, "flip_rate": 69 / 500, "trend": {"flip_rate_delta": 69 / 500 - 43 / 500}},
                               {"max_flip_rate_increase": 0.05, "max_flip_rate": 0.136}) == [
        "flip rate 0.1380 > max_flip_rate 0.136",
        "flip rate rose by 0.0520 since the previous report > max_flip_rate_increase 0.05"]

    # YAML's `true` is no rate of 1 (which would check nothing) nor a row count; NaN is no limit.
    for bad in ({"max_flip_rate": True}, {"min_rows": True}, {"max_error_rate": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            evaluate_thresholds(report, bad)
    with pytest.raises(ValueError, match="max_flip_rat"):
        evaluate_thresholds(report, {"max_flip_rat": 0.1})
    with pytest.raises(ValueError):
        build_report(table, tmp_path / "x", thresholds={"nope": 1})
    assert set(THRESHOLD_KEYS) >= set(strict)


def test_clean_run_has_no_alert_and_trend_shows_the_backdoor(tmp_path: Path) -> None:
    clean = make_output(poison=False, seed=1)
    before = build_report(clean, tmp_path / "before", class_names=CLASS_NAMES)
    thresholds = {"max_class_replaced_rate": 0.3, "max_flip_rate_increase": 0.05}
    assert evaluate_thresholds(before, thresholds) == []

    previous = json.loads((tmp_path / "before" / "report.json").read_text())
    after = build_report(make_output(), tmp_path / "after", previous=previous, thresholds=thresholds,
                         class_names=CLASS_NAMES)
    trend = after["trend"]
    assert trend["previous_generated_at"] == previous["generated_at"]
    assert trend["flip_rate_delta"] == pytest.approx(after["flip_rate"] - previous["flip_rate"])
    assert trend["flip_rate_delta"] > 0.1
    deltas = trend["per_class_replaced_rate_delta"]
    assert max(deltas, key=lambda c: deltas[c] if deltas[c] is not None else -1) == str(TARGET)
    assert deltas[str(TARGET)] > 0.5
    assert any("rose by" in a for a in after["alerts"])
    assert "Trend vs previous report" in (tmp_path / "after" / "report.html").read_text()


def test_html_is_self_contained_and_escaped(tmp_path: Path) -> None:
    table = make_output()
    keys = table.column("key").to_pylist()
    keys[0] = "<script>alert(1)</script>"
    table = table.set_column(0, "key", pa.array(keys))
    build_report(table, tmp_path, class_names=CLASS_NAMES, top_k=40)
    page = (tmp_path / "report.html").read_text()

    srcs = re.findall(r"<img[^>]*\ssrc='([^']*)'", page)
    assert len(re.findall(r"<img\b", page)) == len(srcs)  # every <img> has a src we parsed
    assert len(srcs) >= 2 + 2 * 30  # two plots + before/after of the flagged samples
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:|//)", page)
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page  # no JavaScript at all


def test_without_originals_and_empty_output(tmp_path: Path) -> None:
    report = build_report(make_output(keep_original=False), tmp_path / "a")
    assert report["has_original_images"] is False
    page = (tmp_path / "a" / "report.html").read_text()
    assert "keep_original" in page and "no image" in page

    empty = make_output().slice(0, 0)
    report = build_report(empty, tmp_path / "b", thresholds={"max_flip_rate": 0.1, "min_rows": 1})
    assert report["rows"] == 0 and report["flip_rate"] is None and report["most_replaced"] == []
    assert len(report["alerts"]) == 1 and "nothing was measured" in report["alerts"][0]  # it must not pass
    assert (tmp_path / "b" / "report.html").exists()

    # Every row an error (the black box timed out throughout): the audit alerts whatever its thresholds, none
    # included, so that it neither passes nor becomes the next run's baseline.
    failed = make_output().slice(0, 50)
    failed = failed.set_column(failed.column_names.index("error"), "error", pa.array(["black box: timeout"] * 50))
    for thresholds in ({"max_class_replaced_rate": 0.3}, {}, None):
        report = build_report(failed, tmp_path / "c", thresholds=thresholds)
        assert report["valid_rows"] == 0 and report["alerts"] == [
            "nothing was measured: no valid row (50 rows, 50 of them errors)"], report["alerts"]
    previous = json.loads((tmp_path / "a" / "report.json").read_text())
    report = build_report(failed, tmp_path / "d", previous=previous,
                          thresholds={"max_flip_rate_increase": 0.05, "min_rows": 1})
    assert len(report["alerts"]) == 1 and "nothing was measured" in report["alerts"][0]
    # ... while a run after such a one (whose flip rate is null) only has no trend to check
    after = build_report(make_output(), tmp_path / "e", thresholds={"max_flip_rate_increase": 0.05},
                         previous=json.loads((tmp_path / "d" / "report.json").read_text()))
    assert after["alerts"] == [] and after["trend"]["flip_rate_delta"] is None


def test_load_output_reads_the_directory(tmp_path: Path) -> None:
    table = make_output()
    out = tmp_path / "sanitized"
    out.mkdir()
    pq.write_table(table.slice(0, 120), out / "part-0.parquet")
    # A second file whose error column is all-null: written as `null` type, it must still unify with `string`.
    tail = table.slice(120, 76).drop_columns(["error"])
    tail = tail.append_column("error", pa.nulls(tail.num_rows))
    pq.write_table(tail, out / "part-1.parquet")
    pq.write_table(table.slice(196), out / "part-2.parquet")
    (out / "_checkpoint").write_text("not parquet")  # Ray's bookkeeping files are skipped

    loaded = load_output(out)
    assert loaded.num_rows == 200
    assert loaded.schema.field("error").type == pa.string()
    assert sorted(loaded.column("key").to_pylist()) == sorted(table.column("key").to_pylist())
    small = load_output(str(out), columns=["key", "pred_orig", "not_there"])
    assert small.column_names == ["key", "pred_orig"]
    assert build_report(loaded, tmp_path / "r")["most_replaced"][0]["class"] == TARGET


def test_load_output_from_s3(s3_server, s3_bucket: str) -> None:
    """An s3:// URI resolves like the pipeline's writer resolves it: endpoint from the argument or S3_ENDPOINT_URL."""
    table = make_output()
    fs = s3_server.filesystem()
    pq.write_table(table.slice(0, 100), f"{s3_bucket}/sanitized/part-0.parquet", filesystem=fs)
    pq.write_table(table.slice(100), f"{s3_bucket}/sanitized/part-1.parquet", filesystem=fs)

    loaded = load_output(f"s3://{s3_bucket}/sanitized/", endpoint_url=s3_server.endpoint_url)
    assert loaded.num_rows == 200
    assert load_output(f"{s3_bucket}/sanitized", filesystem=fs, columns=["key"]).num_rows == 200


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium); CI installs it")
def test_html_renders_in_headless_chromium(table: pa.Table, tmp_path: Path) -> None:
    out = tmp_path / "report"
    build_report(table, out, class_names=CLASS_NAMES, thresholds={"max_flip_rate": 0.1})
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,2000",
            (out / "report.html").resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.exists(), proc.stderr[-2000:]
    keep = Path(tempfile.gettempdir()) / "bbpurify-audit-screenshot.png"
    shutil.copyfile(shot, keep)  # left behind on purpose, for a person to look at

    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    non_white = (img.min(axis=2) < 235).mean()
    assert non_white > 0.05, f"screenshot looks blank ({non_white:.3f} non-white)"
    # The plots are colourful (bars, heatmap): a page of plain text would have almost no saturated pixels.
    saturation = img.max(axis=2).astype(int) - img.min(axis=2).astype(int)
    assert (saturation > 60).mean() > 0.01


def test_many_classes_keep_the_charts_readable(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    n = 3000
    po = rng.integers(0, 100, n)
    pp = np.where(rng.random(n) < 0.1, rng.integers(0, 100, n), po)
    pp[po == 42] = 7  # class 42 is always replaced
    table = pa.table({
        "key": [f"k{i}" for i in range(n)], "shard": ["s"] * n, "pred_orig": po, "pred_purified": pp,
        "flagged": po != pp, "flag_score": rng.random(n).astype(np.float32), "error": pa.nulls(n, pa.string()),
    })
    report = build_report(table, tmp_path, top_k=4)
    assert len(report["transitions"]["labels"]) == 100  # the JSON keeps every class
    assert report["most_replaced"][0]["class"] == 42
    page = (tmp_path / "report.html").read_text()
    assert page.count("class='plot'") == 2


def test_a_sink_is_an_alert_whatever_the_thresholds(tmp_path: Path) -> None:
    """A class that absorbs most others after purification voids the purified labels: the report names it and
    alerts, with or without thresholds; with the check off (None) it does neither."""
    table = make_output(n=600, poison=False, keep_original=False)
    po = table["pred_orig"].to_pylist()
    pp = [0 if p is not None and p not in (0, TINY) and i % 3 == 0 else q
          for i, (p, q) in enumerate(zip(po, table["pred_purified"].to_pylist()))]
    table = table.set_column(table.schema.get_field_index("pred_purified"), "pred_purified",
                             pa.array(pp, pa.int64()))
    check = {"absorb_rate": 0.03, "class_share": 0.5, "min_class_rows": 20}
    report = build_report(table, tmp_path / "on", class_names=CLASS_NAMES, sink_check=check)
    [sink] = report["sinks"]
    assert sink["class"] == 0 and len(sink["absorbed"]) >= 5
    [alert] = report["alerts"]
    assert alert.startswith("class 0 absorbs") and "fires on the purified images themselves" in alert
    assert "class 0 absorbs" in (tmp_path / "on" / "report.html").read_text()
    assert json.loads((tmp_path / "on" / "report.json").read_text())["sinks"] == report["sinks"]
    off = build_report(table, tmp_path / "off", class_names=CLASS_NAMES)
    assert off["sinks"] == [] and off["alerts"] == []
    clean = build_report(make_output(n=600, keep_original=False), tmp_path / "clean", sink_check=check)
    assert clean["sinks"] == [] and clean["alerts"] == []  # an ordinary backdoor's target loses rows: no sink
