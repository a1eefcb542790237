"""The audit verb refuses a bad request before any work, and never deletes data it did not write."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.audit import THRESHOLD_KEYS, ThresholdError, Thresholds, build_report, parse_thresholds
from pipeline.audit.run import AuditError, draw_sample, run_audit
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.sources import SourceSpec, inspect_source, row_count
from pipeline.storage import StorageError
from tests.plugins.s3 import make_fmnist_shards

REPO = Path(__file__).resolve().parents[1]


def _existing_output(tmp_path: Path) -> Path:
    """A folder that holds someone's data: a sanitize run's output and its checkpoint."""
    out = tmp_path / "sanitized"
    out.mkdir()
    pq.write_table(pa.table({"key": ["a", "b"], "pred_orig": [1, 2]}), out / "part-0.parquet")
    (out / "_checkpoint").write_text("resume state")
    return out


def _cfg(tmp_path: Path, out: Path, *extra: str):
    # The source does not exist: had the audit started the sanitize run, it would fail with another error.
    return load_config(REPO / "jobs/configs/audit.yaml",
                       [f"source.uri={tmp_path / 'no-such-shards'}", f"output.uri={out}", *extra])


def _untouched(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == ["_checkpoint", "part-0.parquet"]
    assert pq.read_table(out / "part-0.parquet").num_rows == 2


def test_thresholds_model_refuses_unknown_keys_and_out_of_range_values() -> None:
    assert parse_thresholds({"max_flip_rate": 0.2, "min_rows": 10}).as_dict() == {"max_flip_rate": 0.2, "min_rows": 10}
    assert parse_thresholds(None) == Thresholds()
    with pytest.raises(ThresholdError, match="max_flp_rate"):
        parse_thresholds({"max_flp_rate": 0.1})
    for bad in ({"max_flip_rate": 1.5}, {"max_class_replaced_rate": -0.1}, {"min_rows": -1}, {"min_class_rows": 0},
                {"max_flip_rate_increase": 2}, {"max_error_rate": "lots"}):
        with pytest.raises(ThresholdError, match=next(iter(bad))):
            parse_thresholds(bad)
    with pytest.raises(ThresholdError, match="mapping"):
        parse_thresholds([0.1])  # type: ignore[arg-type]
    assert set(THRESHOLD_KEYS) == set(Thresholds.model_fields)


def test_typo_in_a_threshold_fails_before_the_output_is_touched(tmp_path: Path) -> None:
    out = _existing_output(tmp_path)
    with pytest.raises(ThresholdError, match="max_flp_rate"):
        run_audit(_cfg(tmp_path, out), tmp_path / "report", thresholds={"max_flp_rate": 0.1})
    with pytest.raises(ValueError, match="max_flp_rate"):  # in a config: refused when the config is read
        run_audit(_cfg(tmp_path, out, "audit.thresholds={max_flp_rate: 0.1}"), tmp_path / "report")
    _untouched(out)


def test_existing_output_is_refused_not_deleted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = _existing_output(tmp_path)
    with pytest.raises(AuditError, match="already holds data"):
        run_audit(_cfg(tmp_path, out), tmp_path / "report")
    _untouched(out)
    # Even with overwrite, a source that cannot be read fails before the output is cleared.
    with pytest.raises(StorageError):
        run_audit(_cfg(tmp_path, out), tmp_path / "report", overwrite=True)
    _untouched(out)
    # The CLI's default output (no --config) is out/demo/sanitized, the demo's sanitize output: same refusal; the
    # overrides may sit on both sides of an option.
    code = main(["audit", "--report", str(tmp_path / "report"), f"source.uri={tmp_path / 'none'}",
                 "--sample", "5", f"output.uri={out}"])
    assert code == 2 and "already holds data" in capsys.readouterr().err
    _untouched(out)
    with pytest.raises(SystemExit) as stray:  # what is neither an option nor section.key=value is still refused
        main(["audit", f"output.uri={out}", "--sample", "5", "bogus"])
    assert stray.value.code == 2 and "unrecognized arguments: bogus" in capsys.readouterr().err
    # An existing report is somebody's earlier audit: refused too.
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.json").write_text("{}")
    with pytest.raises(AuditError, match="report.json"):
        run_audit(_cfg(tmp_path, tmp_path / "fresh"), tmp_path / "report")
    assert (tmp_path / "report" / "report.json").read_text() == "{}"


def test_audit_sample_becomes_a_fraction_of_the_whole_source(tmp_path: Path) -> None:
    """`audit.sample: N` is drawn as a hash sample of N / rows over every shard, not as the first N rows read."""
    fs = pafs.LocalFileSystem()
    parquet = make_fmnist_shards(fs, str(tmp_path / "pq"), 3, 20, "parquet")
    cfg = _cfg(tmp_path, tmp_path / "out", f"source.uri={parquet.uri}")
    assert cfg.audit.sample == 500 and cfg.source.limit is None  # the shipped audit config samples this way
    drawn = draw_sample(cfg, 15)
    assert cfg.source.sample_fraction == drawn["fraction"] == 15 / 60 and cfg.source.limit is None
    assert drawn == {"rows_asked": 15, "source_rows": 60, "fraction": 0.25, "seed": 0, "limit": None}
    spec = SourceSpec(uri=parquet.uri)
    inspect_source(spec)
    first = sorted((tmp_path / "pq").rglob("*.parquet"))[0]
    first.rename(first.with_suffix(".moved"))
    assert row_count(spec) == 60  # the footers inspect read: counting reads none again
    first.with_suffix(".moved").rename(first)
    draw_sample(cfg := _cfg(tmp_path, tmp_path / "out", f"source.uri={parquet.uri}"), 500)
    assert cfg.source.sample_fraction == 1.0  # more than the source holds: all of it

    folder = make_fmnist_shards(fs, str(tmp_path / "img"), 2, 10, "imagefolder")
    cfg = _cfg(tmp_path, tmp_path / "out", f"source.uri={folder.uri}", "source.format=imagefolder")
    assert draw_sample(cfg, 5)["source_rows"] == 20 and cfg.source.sample_fraction == 0.25

    # A fraction named in the config is kept; the sample caps it by narrowing the hash range (a subset of the
    # fraction's rows, the same on every run), never by keeping the rows read first.
    cfg = _cfg(tmp_path, tmp_path / "out", f"source.uri={parquet.uri}", "source.sample_fraction=0.5",
               "source.sample_seed=7")
    assert draw_sample(cfg, 10) == {"rows_asked": 10, "source_rows": 60, "fraction": 10 / 60, "seed": 7,
                                    "limit": None, "fraction_asked": 0.5}
    cfg = _cfg(tmp_path, tmp_path / "out", f"source.uri={parquet.uri}", "source.sample_fraction=0.1")
    assert draw_sample(cfg, 10)["fraction"] == 0.1 and cfg.source.limit is None  # under the cap: kept as is

    # WebDataset cannot be counted without reading every tar: the audit asks for the fraction before any work.
    tars = make_fmnist_shards(fs, str(tmp_path / "wds"), 2, 5, "webdataset")
    wds = [f"source.uri={tars.uri}", "source.format=webdataset"]
    with pytest.raises(AuditError, match="source.sample_fraction"):
        run_audit(_cfg(tmp_path, tmp_path / "out", *wds), tmp_path / "report")
    assert not (tmp_path / "out").exists()
    cfg = _cfg(tmp_path, tmp_path / "out", *wds, "source.sample_fraction=0.3")
    assert draw_sample(cfg, None)["fraction"] == 0.3 and cfg.source.limit is None
    assert draw_sample(cfg, 2)["fraction"] == 0.3 and cfg.source.limit is None  # not countable: the fraction rules
    with pytest.raises(AuditError, match="at least 1"):
        draw_sample(_cfg(tmp_path, tmp_path / "out", f"source.uri={parquet.uri}"), -3)


def test_overwrite_never_clears_the_source_or_the_baseline(tmp_path: Path) -> None:
    """`overwrite` clears the audit's own output; an output that is or holds the source, or holds the report the
    audit compares with, is refused before anything is deleted."""
    shards = make_fmnist_shards(pafs.LocalFileSystem(), str(tmp_path / "data" / "shards"), 2, 5, "parquet")
    before = sorted(p.name for p in (tmp_path / "data" / "shards").rglob("*"))
    for out in (tmp_path / "data", tmp_path / "data" / "shards", tmp_path / "data" / "shards" / "audit"):
        cfg = _cfg(tmp_path, out, f"source.uri={shards.uri}")
        with pytest.raises(AuditError, match="overlap"):
            run_audit(cfg, tmp_path / "report", overwrite=True)
        assert sorted(p.name for p in (tmp_path / "data" / "shards").rglob("*")) == before

    latest = tmp_path / "audits" / "latest" / "report.json"
    latest.parent.mkdir(parents=True)
    latest.write_text("{}")
    for setting in ("audit.previous", "audit.publish_latest"):
        cfg = _cfg(tmp_path, tmp_path / "audits", f"source.uri={shards.uri}", f"{setting}={latest}")
        with pytest.raises(AuditError, match=f"{setting} .* lies inside the audit output"):
            run_audit(cfg, tmp_path / "report", overwrite=True)
        assert latest.read_text() == "{}"


def test_report_locations_are_checked_before_the_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Where the report goes is checked before the expensive part, not found wrong after it."""
    remote = tmp_path / "reports" / "run7"
    remote.mkdir(parents=True)
    (remote / "report.html").write_text("an earlier audit's")
    with pytest.raises(AuditError, match="already holds report.html"):
        run_audit(_cfg(tmp_path, tmp_path / "out", f"audit.report_uri={remote}"), tmp_path / "report")
    assert (remote / "report.html").read_text() == "an earlier audit's"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(AuditError, match="is a file"):
        run_audit(_cfg(tmp_path, tmp_path / "out", f"audit.report_uri={tmp_path / 'a-file'}"), tmp_path / "report")
    with pytest.raises(AuditError, match="is a folder"):
        run_audit(_cfg(tmp_path, tmp_path / "out", f"audit.publish_latest={remote}"), tmp_path / "report")
    # Past these checks, the audit goes on to the source (which does not exist here).
    with pytest.raises(StorageError):
        run_audit(_cfg(tmp_path, tmp_path / "out", f"audit.report_uri={remote}"), tmp_path / "report",
                  overwrite=True)

    # The CLI: a remote --report, a sample of 0 rows and thresholds that are not JSON are refused, named.
    out = f"output.uri={tmp_path / 'out'}"
    assert main(["audit", "--report", "s3://bucket/reports", out]) == 2
    assert "set audit.report_uri" in capsys.readouterr().err and not Path("s3:").exists()
    assert main(["audit", "--report", str(tmp_path / "r"), "--sample", "0", out]) == 2
    assert "at least 1 row, got 0" in capsys.readouterr().err
    assert main(["audit", "--report", str(tmp_path / "r"), "--thresholds", "{bad", out]) == 2
    assert "--thresholds is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content,match", [
    ("{not json", "Expecting property name"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"version": 1, "rows": 10, "flip_rate": "high", "per_class": {}, "most_replaced": []}),
     "flip_rate"),
    (json.dumps({"version": 1, "rows": 10, "flip_rate": 0.1, "per_class": {"3": {"replaced_rate": "x"}},
                 "most_replaced": []}), "replaced_rate"),
    (json.dumps({"version": 99, "rows": 10}), "version"),
])
def test_malformed_previous_report_fails_before_work(tmp_path: Path, content: str, match: str) -> None:
    out = _existing_output(tmp_path)
    prev = tmp_path / "previous.json"
    prev.write_text(content)
    with pytest.raises(AuditError, match=match):
        run_audit(_cfg(tmp_path, out), tmp_path / "report", previous=str(prev), overwrite=True)
    _untouched(out)  # even with overwrite: the request was refused before anything was deleted


def test_class_names_that_look_like_mathtext_render(tmp_path: Path) -> None:
    n = 60
    po = np.arange(n) % 3
    pp = np.where(po == 0, 1, po)
    table = pa.table({"key": [f"k{i}" for i in range(n)], "shard": ["s"] * n, "pred_orig": po, "pred_purified": pp,
                      "flagged": po != pp, "error": pa.nulls(n, pa.string())})
    names = [r"$\frac{$", "a $x^$ b", "<b>bold</b>"]
    report = build_report(table, tmp_path, class_names=names)
    assert report["most_replaced"][0]["name"] == r"$\frac{$"
    page = (tmp_path / "report.html").read_text()
    assert r"$\frac{$" in page and "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold</b>" not in page
    assert page.count("class='plot'") == 2


def test_template_ships_in_the_wheel(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("bbpurify-*.whl")
    assert "pipeline/audit/templates/report.html.j2" in zipfile.ZipFile(wheel).namelist()


def test_previous_report_on_s3(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    """The scheduled audit's `previous`: absent on the first run (no trend), refused when broken, read when valid."""
    from pipeline.audit.run import read_previous

    uri = f"s3://{s3_bucket}/audits/latest/report.json"
    assert read_previous(uri, s3_server.endpoint_url) is None
    fs = s3_server.filesystem()
    with fs.open_output_stream(f"{s3_bucket}/audits/latest/report.json") as f:
        f.write(b'{"version": 1, "rows": ')
    with pytest.raises(AuditError, match="cannot use the previous report"):
        read_previous(uri, s3_server.endpoint_url)
    table = pa.table({"key": ["a", "b"], "shard": ["s", "s"], "pred_orig": [0, 1], "pred_purified": [0, 0]})
    report = build_report(table, tmp_path)
    with fs.open_output_stream(f"{s3_bucket}/audits/latest/report.json") as f:
        f.write((tmp_path / "report.json").read_bytes())
    assert read_previous(uri, s3_server.endpoint_url)["generated_at"] == report["generated_at"]
