"""The `audit` verb: sanitize a sample with originals kept, build the report next to the output, compare with the
previous report, and return the alerts (the CLI exits non-zero on any, so a scheduler can page someone)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.audit.report import build_report, load_output
from pipeline.config import JobConfig
from pipeline.storage import StorageError, resolve_filesystem

log = logging.getLogger(__name__)


def _read_json(uri: str, endpoint_url: str | None) -> dict | None:
    fs, path = resolve_filesystem(uri, endpoint_url)
    if fs.get_file_info(path).type != pafs.FileType.File:
        log.warning("no previous report at %s: this audit has no trend", uri)
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def _write(uri_dir: str, endpoint_url: str | None, files: dict[str, bytes]) -> None:
    fs, path = resolve_filesystem(uri_dir, endpoint_url)
    fs.create_dir(path, recursive=True)
    for name, data in files.items():
        with fs.open_output_stream(f"{path.rstrip('/')}/{name}") as f:
            f.write(data)


def run_audit(cfg: JobConfig, report_dir: Path | None = None, previous: str | None = None,
              sample: int | None = None, thresholds: dict | None = None) -> list[str]:
    from pipeline.job import _local_abs, run_sanitize

    a = cfg.audit
    sample = sample or a.sample
    cfg = cfg.model_copy(deep=True)
    cfg.output.keep_original = True
    cfg.output.resume = False  # an audit is a fresh sample, never a continuation
    if sample:
        cfg.source.limit = sample
    fs_out, out_path = resolve_filesystem(_local_abs(cfg.output.uri), cfg.output.endpoint_url)
    if fs_out.get_file_info(out_path).type == pafs.FileType.Directory:
        if isinstance(fs_out, pafs.LocalFileSystem):
            shutil.rmtree(out_path)  # a local audit folder is scratch space
        elif fs_out.get_file_info(pafs.FileSelector(out_path, recursive=False)):
            raise StorageError(f"audit output {cfg.output.uri} is not empty: give each audit its own output.uri")
    summary = run_sanitize(cfg)
    table = load_output(_local_abs(cfg.output.uri), endpoint_url=cfg.output.endpoint_url)
    prev_uri = previous or a.previous
    prev = _read_json(prev_uri, cfg.output.endpoint_url) if prev_uri else None
    local = Path(report_dir) if report_dir else Path("out/audit-report")
    report = build_report(table, local, previous=prev, thresholds=thresholds or a.thresholds or None,
                          class_names=cfg.blackbox.class_names)
    files = {name: (local / name).read_bytes() for name in ("report.json", "report.html")}
    remote = a.report_uri or (cfg.output.uri.rstrip("/") + "/_report" if "://" in cfg.output.uri else None)
    if remote:
        _write(remote, cfg.output.endpoint_url, files)
    if a.publish_latest:
        fs, path = resolve_filesystem(a.publish_latest, cfg.output.endpoint_url)
        with fs.open_output_stream(path) as f:
            f.write(files["report.json"])
    top = report["most_replaced"][0] if report["most_replaced"] else None
    print(summary.line())
    line = f"audit: {report['rows']} rows, flip rate {report['flip_rate']:.3f}"
    if top:
        rate = report["per_class"][str(top["class"])]["replaced_rate"]
        line += f", most replaced class {top['class']} (replaced rate {rate:.3f})"
    print(line)
    print(f"report: {(local / 'report.html').resolve()}" + (f" and {remote}/" if remote else ""))
    for alert in report["alerts"]:
        print(f"ALERT: {alert}")
    return list(report["alerts"])
