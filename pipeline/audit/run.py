"""The `audit` verb: sanitize a sample with originals kept, build the report next to the output, compare with the
previous report, and return the alerts (the CLI exits non-zero on any, so a scheduler can page someone).

Everything that can be wrong with the request (thresholds, the previous report, an output or report folder that
already holds data, an output that overlaps the source or the reports) is checked before the sanitize run, which is
the expensive part, and before `overwrite` clears anything. An audit never deletes or overwrites what it did not
write in this run unless the caller passes `overwrite=True`.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.audit.report import build_report, check_previous, load_output
from pipeline.audit.thresholds import parse_thresholds
from pipeline.config import JobConfig
from pipeline.storage import describe, overlap, resolve_filesystem

log = logging.getLogger(__name__)
REPORT_FILES = ("report.json", "report.html")


class AuditError(ValueError):
    """The audit request cannot be carried out as asked; nothing was purified or written."""


@dataclass(frozen=True)
class AuditOutcome:
    alerts: list[str]
    # Error rows whose cause can pass by itself (the black box down, slow, out of budget, refusing the token): the
    # audit measured fewer rows than it drew, and a later run may see them all.
    retryable: int


def read_previous(uri: str, endpoint_url: str | None) -> dict | None:
    """The previous run's report.json, checked; None (no trend, a warning) when there is none yet, as on the first
    scheduled run. A report that exists but is not one this audit can compare with is an AuditError."""
    fs, path = resolve_filesystem(uri, endpoint_url)
    if fs.get_file_info(path).type != pafs.FileType.File:
        log.warning("no previous report at %s: this audit has no trend", uri)
        return None
    with fs.open_input_stream(path) as f:
        raw = f.read()
    try:
        return check_previous(json.loads(raw), where=f"previous report {uri}")
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise AuditError(f"cannot use the previous report {uri} for the trend: {e}. Point audit.previous / "
                         "--previous at a report.json this audit wrote, or drop it to run without a trend") from None


def _write(uri_dir: str, endpoint_url: str | None, files: dict[str, bytes]) -> None:
    fs, path = resolve_filesystem(uri_dir, endpoint_url)
    fs.create_dir(path, recursive=True)
    for name, data in files.items():
        with fs.open_output_stream(f"{path.rstrip('/')}/{name}") as f:
            f.write(data)


def _holds_data(fs: pafs.FileSystem, path: str) -> bool:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return True
    return info.type == pafs.FileType.Directory and bool(fs.get_file_info(pafs.FileSelector(path, recursive=False)))


def _check_output(uri: str, endpoint_url: str | None, overwrite: bool) -> bool:
    """Refuse an output that already holds data (a sanitize run's output, a previous audit) unless overwrite;
    return whether it holds data to clear."""
    fs, path = resolve_filesystem(uri, endpoint_url)
    if not _holds_data(fs, path):
        return False
    if not overwrite:
        raise AuditError(f"audit output {uri} already holds data; an audit writes a fresh sample and never deletes "
                         "what it did not write: give it its own output.uri (e.g. one prefix per run), or ask for "
                         "the folder to be replaced with overwrite")
    return True


def _check_apart(cfg: JobConfig, out_uri: str, files: dict[str, str]) -> None:
    """Refuse an output that is the source, lies inside it or holds it (`overwrite` would delete the data to audit;
    the job would read its own output as shards), or that holds a report this audit reads or publishes (`overwrite`
    would delete the baseline)."""
    from pipeline.job import source_spec
    from pipeline.paths import absolute_uri

    fs_out, out_path = resolve_filesystem(out_uri, cfg.output.endpoint_url)
    spec = source_spec(cfg)
    fs_in, src_path = resolve_filesystem(spec.uri, spec.endpoint_url)
    if overlap(fs_in, src_path, fs_out, out_path):
        raise AuditError(f"the audit output {describe(fs_out, out_path)} and the source {describe(fs_in, src_path)} "
                         "overlap (one is the other or lies inside it): give the audit an output.uri of its own")
    for what, uri in files.items():
        fs, path = resolve_filesystem(absolute_uri(uri), cfg.output.endpoint_url)
        if overlap(fs, path, fs_out, out_path):
            raise AuditError(f"{what} {describe(fs, path)} lies inside the audit output {describe(fs_out, out_path)}, "
                             "which every audit writes afresh: keep reports outside output.uri (e.g. "
                             "audits/latest/report.json next to audits/<run id>/)")


def _check_report_target(uri: str, endpoint_url: str | None, what: str, overwrite: bool,
                         names: tuple[str, ...] = ()) -> None:
    """Fail before the run, not after it, on a report location that cannot take the report: a folder where a file
    goes, a file where a folder goes, or report files already there (without overwrite)."""
    fs, path = resolve_filesystem(uri, endpoint_url)
    info = fs.get_file_info(path)
    if not names:  # a file: publish_latest
        if info.type == pafs.FileType.Directory:
            raise AuditError(f"{what} {describe(fs, path)} is a folder; it names the report.json file to write")
        return
    if info.type == pafs.FileType.File:
        raise AuditError(f"{what} {describe(fs, path)} is a file; it names the folder to write "
                         f"{' and '.join(names)} into")
    there = [n for n in names if fs.get_file_info(f"{path.rstrip('/')}/{n}").type == pafs.FileType.File]
    if there and not overwrite:
        raise AuditError(f"{what} {describe(fs, path)} already holds {', '.join(there)}: give this audit its own "
                         "report location, or ask for the files to be replaced with overwrite")


def _clear_output(uri: str, endpoint_url: str | None) -> None:
    fs, path = resolve_filesystem(uri, endpoint_url)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        fs.delete_file(path)
    elif isinstance(fs, pafs.LocalFileSystem):
        shutil.rmtree(path)
    else:
        fs.delete_dir_contents(path)


def draw_sample(cfg: JobConfig, sample: int | None) -> dict:
    """Turn the audit's `sample` (about N rows) into the source's stable hash sample, on `cfg` in place, and return
    how the rows are drawn, for the report.

    The fraction is N / the rows the source holds now: the same rows on every run while the source is unchanged; as
    it grows, the fraction shrinks and the sample keeps the rows of lowest hash (most of the previous sample) plus
    new rows at the same rate as old ones. A fixed `source.sample_fraction` keeps every sampled row instead; N then
    caps it by narrowing the fraction (the rows of lowest hash: a subset of that sample, the same on every run), or
    is not applied where the source cannot be counted. Never by `source.limit`, which keeps the rows read first."""
    from pipeline.job import source_spec
    from pipeline.sources import row_count

    s = cfg.source
    if sample is not None and sample < 1:
        raise AuditError(f"the audit sample must be at least 1 row, got {sample}")
    rows = None
    asked = s.sample_fraction
    if sample:
        rows = row_count(source_spec(cfg), list_images=True)
    if sample and asked is None:
        if rows is None:
            raise AuditError(f"audit.sample={sample} needs the source's row count, which is not known up front here "
                             "(a WebDataset source): set source.sample_fraction instead (e.g. "
                             "source.sample_fraction=0.01 audits about 1% of the rows, the same ones every run)")
        s.sample_fraction = min(1.0, sample / rows) if rows else 1.0
    elif sample and rows is None:
        log.warning("audit.sample=%d is not applied: the source's rows cannot be counted up front, so "
                    "source.sample_fraction=%g alone draws the sample", sample, asked)
    elif sample and rows * asked > sample:
        s.sample_fraction = sample / rows
    return {"rows_asked": sample, "source_rows": rows, "fraction": s.sample_fraction, "seed": s.sample_seed,
            "limit": s.limit, **({"fraction_asked": asked} if asked is not None else {})}


def run_audit(cfg: JobConfig, report_dir: Path | str | None = None, previous: str | None = None,
              sample: int | None = None, thresholds: dict | None = None, overwrite: bool = False) -> AuditOutcome:
    """Sanitize a sample, write the report, return its alerts and how many rows are left to retry. `overwrite` lets
    the audit replace an output folder and report files that already exist; without it, they make the audit fail
    before any work."""
    from pipeline.job import run_sanitize
    from pipeline.paths import absolute_uri

    a = cfg.audit
    checked = parse_thresholds(thresholds if thresholds is not None else a.thresholds)
    for name in cfg.blackbox.class_names or []:
        if not isinstance(name, str) or not name.strip():
            raise AuditError(f"blackbox.class_names must be non-empty strings, got {name!r}")
    cfg = cfg.model_copy(deep=True)
    cfg.output.keep_original = True
    cfg.output.resume = False  # an audit is a fresh sample, never a continuation
    out_uri = absolute_uri(cfg.output.uri)
    endpoint = cfg.output.endpoint_url
    prev_uri = previous or a.previous
    if report_dir is not None and "://" in str(report_dir):
        raise AuditError(f"the report folder (--report) is a local folder, got {report_dir}: to put the report in "
                         "object storage, set audit.report_uri")
    _check_apart(cfg, out_uri, {name: uri for name, uri in (("audit.previous", prev_uri),
                                                          ("audit.publish_latest", a.publish_latest)) if uri})
    prev = read_previous(absolute_uri(prev_uri), endpoint) if prev_uri else None
    local = Path(report_dir) if report_dir else Path("out/audit-report")
    existing = [local / n for n in REPORT_FILES if (local / n).exists()]
    if existing and not overwrite:
        raise AuditError(f"report folder {local} already holds {', '.join(p.name for p in existing)}: give this "
                         "audit its own report folder (--report), or ask for the files to be replaced with overwrite")
    remote = a.report_uri or (cfg.output.uri.rstrip("/") + "/_report" if "://" in cfg.output.uri else None)
    if a.report_uri:  # the default lies in the output, checked (and cleared with overwrite) with it
        _check_report_target(absolute_uri(a.report_uri), endpoint, "audit.report_uri", overwrite, REPORT_FILES)
    if a.publish_latest:
        _check_report_target(absolute_uri(a.publish_latest), endpoint, "audit.publish_latest", overwrite)
    to_clear = _check_output(out_uri, endpoint, overwrite)
    # lists the source: a wrong one fails before anything is deleted
    drawn = draw_sample(cfg, a.sample if sample is None else sample)
    if to_clear:
        _clear_output(out_uri, endpoint)

    summary = run_sanitize(cfg)
    table = load_output(out_uri, endpoint_url=endpoint)
    sink_check = cfg.sink_check.settings if cfg.sink_check.enabled else None
    report = build_report(table, local, previous=prev, thresholds=checked, class_names=cfg.blackbox.class_names,
                          sample=drawn, sink_check=sink_check)
    files = {name: (local / name).read_bytes() for name in REPORT_FILES}
    if remote:
        _write(remote, endpoint, files)
    if a.publish_latest and report["alerts"]:
        # An alerting run does not become the baseline: a lasting jump would alert once, then be the new normal.
        log.warning("this audit raised alerts: %s is kept as the baseline; to accept this run as the new one, copy "
                    "its report.json there", a.publish_latest)
    elif a.publish_latest and summary.retryable:
        # Rates measured on what the black box happened to answer: not a baseline to compare the next runs with.
        log.warning("%d rows are left to retry (the black box did not answer them): %s is kept as the baseline",
                    summary.retryable, a.publish_latest)
    elif a.publish_latest:
        # The one file an audit overwrites on purpose: the user named it as the next run's `previous`.
        fs, path = resolve_filesystem(absolute_uri(a.publish_latest), endpoint)
        if isinstance(fs, pafs.LocalFileSystem):  # object stores have no folders to create
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        with fs.open_output_stream(path) as f:
            f.write(files["report.json"])
    top = report["most_replaced"][0] if report["most_replaced"] else None
    print(summary.line(rerun="run the audit again (a new output.uri) to see them"))
    flip = report["flip_rate"]
    line = f"audit: {report['rows']} rows, flip rate " + ("n/a" if flip is None else f"{flip:.3f}")
    if top:
        rate = report["per_class"][str(top["class"])]["replaced_rate"]
        line += f", most replaced class {top['class']} (replaced rate {rate:.3f})"
    trend = report.get("trend")
    if trend and trend.get("flip_rate_delta") is not None:
        line += f", flip rate {trend['flip_rate_delta']:+.3f} since {trend['previous_generated_at']}"
    print(line)
    print(f"report: {(local / 'report.html').resolve()}" + (f" and {remote}/" if remote else ""))
    for alert in report["alerts"]:
        print(f"ALERT: {alert}")
    return AuditOutcome(list(report["alerts"]), summary.retryable)

