"""Audit report over the pipeline output: flip rates, the classes purification replaces, a transition matrix,
the most suspicious samples with before/after images, trend vs the previous run, and threshold alerts.

A backdoor target class shows up as a class that purified images *leave*: poisoned inputs are predicted as the
target before purification (the trigger works) and as their true class after it (the trigger is gone). So the
headline per-class number is the replaced rate: of the rows with pred_orig == c, the share with pred_purified != c.

Pure pyarrow + numpy + matplotlib (Agg, through `Figure` so no pyplot global state) + Jinja2 (the page is
`templates/report.html.j2`, autoescaped); no Ray, so the CLI's audit verb can run it on a laptop against the Parquet
the cluster wrote.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from pipeline.audit.thresholds import DEFAULT_MIN_CLASS_ROWS, Thresholds, parse_thresholds
from pipeline.flows import SINK_MEANING, sinks_in_table, wilson_lower
from pipeline.storage import resolve_filesystem, uri_path  # pyarrow only, no Ray

REPORT_VERSION = 1
IMAGE_COLUMNS = ("image_png", "image_orig_png")

MAX_PLOT_CLASSES = 30  # beyond this, charts show the classes that matter; the JSON keeps all


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def _empty_output(columns: Sequence[str] | None) -> pa.Table:
    from pipeline.sink import output_schema

    table = output_schema(keep_orig=True).empty_table()
    return table if columns is None else table.select([c for c in columns if c in table.column_names])


def load_output(
    uri: str | Path,
    filesystem: pafs.FileSystem | None = None,
    columns: Sequence[str] | None = None,
    *,
    endpoint_url: str | None = None,
) -> pa.Table:
    """Read the pipeline's Parquet output directory (local path, `s3://...`, or a path on `filesystem`).

    Without `filesystem`, the URI resolves the way the pipeline's own writer resolved it (pipeline.storage: S3
    endpoint from `endpoint_url` or env S3_ENDPOINT_URL, credentials from the AWS chain). Files whose names start
    with `.` or `_` are skipped (pyarrow's default), which leaves out in-flight and bookkeeping files. Schemas are
    unified across files because a resumed run may have written an all-null column as `null` type in one file and
    `string` in another.
    """
    if filesystem is None:
        filesystem, source = resolve_filesystem(str(uri), endpoint_url)
    elif "://" in str(uri):
        source = uri_path(str(uri))
    elif isinstance(filesystem, pafs.LocalFileSystem):
        source = str(Path(uri).resolve())
    else:  # already a path inside `filesystem` ("bucket/prefix")
        source = str(uri).strip("/")
    if filesystem.get_file_info(source).type == pafs.FileType.NotFound:
        return _empty_output(columns)
    dataset = ds.dataset(source, format="parquet", filesystem=filesystem)
    fragments = list(dataset.get_fragments())
    if not fragments:  # a run that wrote no row writes no file (Ray skips empty writes)
        return _empty_output(columns)
    if len(fragments) > 1:
        schema = pa.unify_schemas([f.physical_schema for f in fragments], promote_options="permissive")
        dataset = ds.dataset(source, format="parquet", filesystem=filesystem, schema=schema)
    wanted = None if columns is None else [c for c in columns if c in dataset.schema.names]
    return dataset.to_table(columns=wanted)


# ---------------------------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------------------------


def _int_column(table: pa.Table, name: str, fill: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """(values with nulls filled, validity mask) as numpy; a missing column is all-null."""
    n = table.num_rows
    if name not in table.column_names:
        return np.full(n, fill, dtype=np.int64), np.zeros(n, dtype=bool)
    col = table.column(name)
    valid = pc.is_valid(col).to_numpy(zero_copy_only=False).astype(bool)
    values = pc.fill_null(col.cast(pa.int64()), fill).to_numpy(zero_copy_only=False).astype(np.int64)
    return values, valid


def _float_column(table: pa.Table, name: str) -> np.ndarray:
    """Float values with nulls (and a missing column) as NaN."""
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    col = table.column(name).cast(pa.float64())
    return pc.fill_null(col, float("nan")).to_numpy(zero_copy_only=False).astype(np.float64)


def _error_mask(table: pa.Table) -> np.ndarray:
    if "error" not in table.column_names:
        return np.zeros(table.num_rows, dtype=bool)
    col = table.column("error").cast(pa.string())
    return pc.fill_null(pc.not_equal(col, ""), False).to_numpy(zero_copy_only=False).astype(bool)


def _rate(num: int | float, den: int | float) -> float | None:
    return float(num) / float(den) if den else None


def _name(c: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= c < len(class_names):
        return str(class_names[c])
    return str(c)


def _value_counts(table: pa.Table, name: str, limit: int = 20) -> dict[str, int]:
    if name not in table.column_names or table.num_rows == 0:
        return {}
    counts = pc.value_counts(table.column(name)).to_pylist()
    counts.sort(key=lambda d: -d["counts"])
    return {str(d["values"]): int(d["counts"]) for d in counts[:limit]}


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON; numpy scalars are not JSON-serializable."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return None
    return value


def _trend(report: dict, previous: dict) -> dict:
    def delta(key: str) -> float | None:
        a, b = report.get(key), previous.get(key)
        return None if a is None or b is None else float(a) - float(b)

    prev_classes = previous.get("per_class") or {}
    per_class: dict[str, float | None] = {}
    for c, stats in report["per_class"].items():
        before = (prev_classes.get(c) or {}).get("replaced_rate")
        now = stats.get("replaced_rate")
        per_class[c] = None if before is None or now is None else now - before
    prev_top = (previous.get("most_replaced") or [{}])[0].get("class")
    now_top = (report.get("most_replaced") or [{}])[0].get("class")
    return {
        "previous_generated_at": previous.get("generated_at"),
        "previous_rows": previous.get("rows"),
        "flip_rate_delta": delta("flip_rate"),
        "error_rate_delta": delta("error_rate"),
        "mean_nfe_delta": delta("mean_nfe"),
        "rows_delta": delta("rows"),
        "per_class_replaced_rate_delta": per_class,
        "previous_top_replaced": prev_top,
        "top_replaced_changed": prev_top is not None and now_top is not None and prev_top != now_top,
    }


def _summarize(table: pa.Table, class_names: Sequence[str] | None, top_k: int) -> tuple[dict, np.ndarray]:
    """All report numbers, plus the row indices of the suspicious samples (for the image grid)."""
    n = table.num_rows
    is_error = _error_mask(table)
    po, po_ok = _int_column(table, "pred_orig")
    pp, pp_ok = _int_column(table, "pred_purified")
    valid = ~is_error & po_ok & pp_ok
    flipped = valid & (po != pp)
    n_valid = int(valid.sum())

    seen = np.concatenate([po[valid], pp[valid]])
    named = np.arange(len(class_names)) if class_names else np.zeros(0, dtype=np.int64)
    classes = np.unique(np.concatenate([seen, named])).astype(np.int64)
    k = len(classes)

    matrix = np.zeros((k, k), dtype=np.int64)
    if n_valid:
        np.add.at(matrix, (np.searchsorted(classes, po[valid]), np.searchsorted(classes, pp[valid])), 1)

    per_class: dict[str, dict] = {}
    for i, c in enumerate(classes.tolist()):
        rows_c = int(matrix[i].sum())
        replaced = rows_c - int(matrix[i, i])
        received = int(matrix[:, i].sum()) - int(matrix[i, i])
        per_class[str(c)] = {
            "name": _name(c, class_names),
            "rows": rows_c,  # rows with pred_orig == c
            "replaced": replaced,  # ... whose purified prediction is another class
            "replaced_rate": _rate(replaced, rows_c),
            "replaced_rate_lcb": wilson_lower(replaced, rows_c),
            "received": received,  # rows of other classes that purification turned into c
            "purified_rows": int(matrix[:, i].sum()),
            "share_orig": _rate(rows_c, n_valid),
            "share_purified": _rate(int(matrix[:, i].sum()), n_valid),
        }
    # Rank by the Wilson lower bound: support matters, a class seen twice is not a finding.
    ranking = sorted(
        (c for c in per_class if per_class[c]["rows"] > 0),
        key=lambda c: (-per_class[c]["replaced_rate_lcb"], -(per_class[c]["replaced_rate"] or 0.0), int(c)),
    )
    most_replaced = [
        {
            "class": int(c),
            "name": per_class[c]["name"],
            "rows": per_class[c]["rows"],
            "replaced": per_class[c]["replaced"],
            "replaced_rate": per_class[c]["replaced_rate"],
            "replaced_rate_lcb": per_class[c]["replaced_rate_lcb"],
        }
        for c in ranking
    ]

    nfe = _float_column(table, "nfe")
    nfe_valid = nfe[valid & np.isfinite(nfe)]

    label, label_ok = _int_column(table, "label")
    labelled = valid & label_ok & (label >= 0)
    n_labelled = int(labelled.sum())
    labels = None
    if n_labelled:
        labels = {
            "rows": n_labelled,
            "accuracy_orig": float((po[labelled] == label[labelled]).mean()),
            "accuracy_purified": float((pp[labelled] == label[labelled]).mean()),
            # purification restoring the true label on rows the black box got wrong: the poisoned-input signature
            "restored": int((labelled & (po != label) & (pp == label)).sum()),
            "broken": int((labelled & (po == label) & (pp != label)).sum()),
        }

    # Suspicious: flagged rows (the pipeline's own flag, else the flip), highest flag_score first, nulls last.
    if "flagged" in table.column_names:
        flag = pc.fill_null(table.column("flagged").cast(pa.bool_()), False).to_numpy(zero_copy_only=False)
        flag = valid & flag.astype(bool)
    else:
        flag = flipped
    score = _float_column(table, "flag_score")
    cand = np.flatnonzero(flag)
    order = np.lexsort((cand, -np.nan_to_num(score[cand], nan=-np.inf)))  # stable: ties keep input order
    chosen = cand[order][: max(0, top_k)]

    def cell(name: str, i: int) -> Any:
        return table.column(name)[int(i)].as_py() if name in table.column_names else None

    suspicious = [
        {
            "key": cell("key", i),
            "shard": cell("shard", i),
            "label": cell("label", i),
            "pred_orig": int(po[i]),
            "pred_purified": int(pp[i]),
            "score_orig": cell("score_orig", i),
            "score_purified": cell("score_purified", i),
            "flag_score": cell("flag_score", i),
            "nfe": cell("nfe", i),
        }
        for i in chosen.tolist()
    ]

    errors = int(is_error.sum())
    if "retryable" in table.column_names:
        # error rows whose cause can pass by itself (the black box down, slow or out of budget): the audit saw
        # less of the data than it meant to, and says so
        flagged_retryable = table.column("retryable").fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
        retryable_errors = int((flagged_retryable & is_error).sum())
    else:
        retryable_errors = 0
    summary = {
        "rows": n,
        "errors": errors,
        "retryable_errors": retryable_errors,
        "error_rate": _rate(errors, n),
        "valid_rows": n_valid,
        "flipped": int(flipped.sum()),
        "flip_rate": _rate(int(flipped.sum()), n_valid),
        "flagged": int(flag.sum()),
        "mean_nfe": float(nfe_valid.mean()) if nfe_valid.size else None,
        "total_nfe": float(nfe_valid.sum()) if nfe_valid.size else 0.0,
        "shards": int(pc.count_distinct(table.column("shard")).as_py()) if "shard" in table.column_names else 0,
        "methods": _value_counts(table, "method"),
        "params": list(_value_counts(table, "params", limit=5)),
        "top_errors": _value_counts(table.filter(pa.array(is_error)), "error", limit=5) if errors else {},
        "classes": classes.tolist(),
        "class_names": {str(c): _name(c, class_names) for c in classes.tolist()},
        "per_class": per_class,
        "most_replaced": most_replaced,
        "transitions": {"labels": classes.tolist(), "matrix": matrix.tolist()},
        "labels": labels,
        "suspicious": suspicious,
        "has_original_images": "image_orig_png" in table.column_names,
    }
    return summary, chosen


# ---------------------------------------------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------------------------------------------


def _over(value: float, limit: float) -> bool:
    # Rates are ratios of counts and a trend is a difference of two of them: 68/500 - 43/500 lands a rounding error
    # above 0.05, and a rise of exactly the limit must not alert.
    return value > limit + 1e-9


def evaluate_thresholds(report: dict, thresholds: Thresholds | dict | None) -> list[str]:
    """Human-readable alerts for every threshold the report crosses; empty when all is well.

    A rate that cannot be measured (no rows, no valid rows) is itself an alert when a threshold asks for it, and an
    audit with no valid row at all alerts whatever its thresholds: an audit that saw nothing must not pass (nor
    become the next run's baseline).
    """
    t = parse_thresholds(thresholds)
    alerts: list[str] = []
    if not report.get("valid_rows", report.get("rows", 0)):
        # the one alert that says it all: each threshold's own "cannot be measured" would only repeat it
        return [f"nothing was measured: no valid row ({report.get('rows', 0)} rows, {report.get('errors', 0)} of "
                "them errors)"]

    def check(value: float | None, limit: float, what: str, key: str) -> None:
        if value is None:
            alerts.append(f"{what} cannot be measured (no valid rows) but {key}={limit} is set")
        elif _over(value, limit):
            alerts.append(f"{what} {value:.4f} > {key} {limit}")

    valid = report.get("valid_rows", report.get("rows", 0))
    if t.min_rows is not None and valid < t.min_rows:
        # error rows are not evidence either way: an audit whose black box timed out on every row saw nothing
        alerts.append(f"valid rows {valid} < min_rows {t.min_rows} ({report.get('rows', 0)} rows, "
                      f"{report.get('errors', 0)} of them errors)")
    if t.max_flip_rate is not None:
        check(report.get("flip_rate"), t.max_flip_rate, "flip rate", "max_flip_rate")
    if t.max_error_rate is not None:
        check(report.get("error_rate"), t.max_error_rate, "error rate", "max_error_rate")
    if t.max_class_replaced_rate is not None:
        limit = t.max_class_replaced_rate
        min_rows = t.min_class_rows if t.min_class_rows is not None else DEFAULT_MIN_CLASS_ROWS
        if not valid:
            alerts.append(f"class replaced rates cannot be measured (no valid rows) but max_class_replaced_rate="
                          f"{limit} is set")
        for c, stats in sorted(report.get("per_class", {}).items(), key=lambda kv: int(kv[0])):
            rate = stats.get("replaced_rate")
            if stats.get("rows", 0) >= min_rows and rate is not None and _over(rate, limit):
                alerts.append(
                    f"class {c} ({stats.get('name', c)}) replaced rate {rate:.4f} > max_class_replaced_rate "
                    f"{limit} ({stats['replaced']}/{stats['rows']} rows left the class after purification)"
                )
    if t.max_flip_rate_increase is not None:
        limit = t.max_flip_rate_increase
        d = (report.get("trend") or {}).get("flip_rate_delta")
        if report.get("flip_rate") is None:
            # this run cannot be compared; a previous run without a flip rate only leaves no trend to check
            check(None, limit, "flip rate increase", "max_flip_rate_increase")
        elif d is not None and _over(d, limit):
            alerts.append(f"flip rate rose by {d:.4f} since the previous report > max_flip_rate_increase {limit}")
    return alerts


# ---------------------------------------------------------------------------------------------------------------
# The previous report
# ---------------------------------------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def check_previous(previous: Any, where: str = "previous report") -> dict:
    """Refuse a previous report the trend cannot use, naming the first field that is wrong.

    Called before any work, so that a truncated or hand-edited report.json fails the audit in seconds, not after
    the whole sanitize run."""
    if not isinstance(previous, dict):
        raise ValueError(f"{where} is not a JSON object (got {type(previous).__name__})")
    if previous.get("version") != REPORT_VERSION:
        raise ValueError(f"{where} has version {previous.get('version')!r}, this audit writes {REPORT_VERSION}")
    for key in ("rows", "flip_rate", "error_rate", "mean_nfe"):
        if not _is_number(previous.get(key)):
            raise ValueError(f"{where}: {key} must be a number or null, got {previous.get(key)!r}")
    per_class = previous.get("per_class")
    if not isinstance(per_class, dict):
        raise ValueError(f"{where}: per_class must be an object, got {type(per_class).__name__}")
    for c, stats in per_class.items():
        if not isinstance(stats, dict) or not _is_number(stats.get("replaced_rate")):
            raise ValueError(f"{where}: per_class[{c!r}].replaced_rate must be a number or null")
    top = previous.get("most_replaced")
    if not isinstance(top, list) or not all(isinstance(r, dict) for r in top):
        raise ValueError(f"{where}: most_replaced must be a list of objects")
    return previous


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


def _figure_data_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _png_data_uri(data: bytes | None) -> str | None:
    # Only PNG signatures are embedded: the bytes come from the dataset, and anything else is not shown as an image.
    if not data or not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _class_chart(report: dict, previous: dict | None) -> str | None:
    from matplotlib.figure import Figure  # imported late: a JSON-only caller never pays for matplotlib

    # Many-class models (ImageNet): only the most replaced classes fit in a readable chart.
    classes = [r["class"] for r in report["most_replaced"][:MAX_PLOT_CLASSES]]
    if not classes:
        return None
    classes = sorted((str(c) for c in classes), key=int)
    rates = [report["per_class"][c]["replaced_rate"] or 0.0 for c in classes]
    names = [report["per_class"][c]["name"] for c in classes]
    top = report["most_replaced"][0]["class"] if report["most_replaced"] else None
    fig = Figure(figsize=(max(6.0, 0.55 * len(classes) + 2), 3.6))
    ax = fig.add_subplot()
    colors = ["#c0392b" if int(c) == top else "#2e86c1" for c in classes]
    ax.bar(range(len(classes)), rates, color=colors, label="replaced rate")
    if report.get("flip_rate") is not None:
        ax.axhline(report["flip_rate"], color="#555", linestyle="--", linewidth=1, label="overall flip rate")
    if previous and previous.get("per_class"):
        prev = [(previous["per_class"].get(c) or {}).get("replaced_rate") for c in classes]
        xs = [i for i, v in enumerate(prev) if v is not None]
        ax.scatter(xs, [prev[i] for i in xs], marker="_", s=400, color="black", zorder=3, label="previous run")
    ax.set_xticks(range(len(classes)))
    # parse_math=False: a class name is text, never mathtext ("$\\frac{$" would raise inside savefig).
    ax.set_xticklabels(names, rotation=45 if len(classes) > 8 else 0, ha="right" if len(classes) > 8 else "center",
                       parse_math=False)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of rows leaving the class")
    ax.set_xlabel("class predicted on the original image (pred_orig)")
    ax.set_title("Per-class replaced rate after purification")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: never hides a bar
    return _figure_data_uri(fig)


def _heatmap(report: dict) -> str | None:
    from matplotlib.figure import Figure

    labels = report["transitions"]["labels"]
    m = np.asarray(report["transitions"]["matrix"], dtype=np.float64)
    if not labels or m.sum() == 0:
        return None
    if len(labels) > MAX_PLOT_CLASSES:
        # Keep the classes most involved in flips (leaving or receiving); the full matrix stays in report.json.
        off = m - np.diag(np.diag(m))
        keep = np.sort(np.argsort(-(off.sum(axis=0) + off.sum(axis=1)), kind="stable")[:MAX_PLOT_CLASSES])
        m = m[np.ix_(keep, keep)]
        labels = [labels[i] for i in keep]
    # Row-normalized colours so a big class does not wash out the rest; raw counts are written in the cells.
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    names = [report["class_names"].get(str(c), str(c)) for c in labels]
    side = min(14.0, max(4.5, 0.42 * len(labels) + 2.5))
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    ax.set_xticks(range(len(labels)))
    ax.set_yticks(range(len(labels)))
    ax.set_xticklabels(names, rotation=45, ha="right", parse_math=False)
    ax.set_yticklabels(names, parse_math=False)
    ax.set_xlabel("pred_purified")
    ax.set_ylabel("pred_orig")
    ax.set_title("Transitions pred_orig -> pred_purified")
    if len(labels) <= 15:
        for i in range(len(labels)):
            for j in range(len(labels)):
                if m[i, j]:
                    ax.text(
                        j,
                        i,
                        str(int(m[i, j])),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="black" if norm[i, j] > 0.6 else "white",
                    )
    return _figure_data_uri(fig)


def _fmt(value: Any, digits: int = 3, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{100 * value:.1f}%" if pct else f"{value:.{digits}f}"
    return str(value)


def _fmt_delta(value: float | None, pct: bool = True) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:+.1f} pp" if pct else f"{value:+.2f}"


@functools.cache
def _template() -> Any:
    import jinja2  # imported late, like matplotlib: a JSON-only caller never pays for it

    # Autoescaped: keys, class names and error messages come from the data and the config, never trusted as HTML.
    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline.audit", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    return env.get_template("report.html.j2")


def _render_html(report: dict, table: pa.Table, chosen: np.ndarray, previous: dict | None) -> str:
    cards = [
        ("rows", _fmt(report["rows"])),
        ("errors", f"{report['errors']} ({_fmt(report['error_rate'], pct=True)})"
                   + (f", {report['retryable_errors']} retryable" if report.get("retryable_errors") else "")),
        ("flip rate", _fmt(report["flip_rate"], pct=True)),
        ("flagged", _fmt(report["flagged"])),
        ("mean NFE", _fmt(report["mean_nfe"], digits=1)),
        ("shards", _fmt(report["shards"])),
    ]
    if report["most_replaced"]:
        top = report["most_replaced"][0]
        cards.append(("most replaced class", f"{top['name']} ({_fmt(top['replaced_rate'], pct=True)})"))
    if report.get("labels"):
        lab = report["labels"]
        cards.append(("accuracy orig / purified",
                      f"{_fmt(lab['accuracy_orig'], pct=True)} / {_fmt(lab['accuracy_purified'], pct=True)}"))

    trend = report.get("trend")
    trend_view = None
    if trend:
        top_was = None
        if trend.get("top_replaced_changed"):
            was = str(trend["previous_top_replaced"])
            top_was = report["class_names"].get(was, was)
        trend_view = {
            "previous_generated_at": str(trend.get("previous_generated_at")),
            "previous_rows": str(trend.get("previous_rows")),
            "rows": [("flip rate", _fmt_delta(trend["flip_rate_delta"])),
                     ("error rate", _fmt_delta(trend["error_rate_delta"])),
                     ("mean NFE", _fmt_delta(trend["mean_nfe_delta"], pct=False))],
            "top_was": top_was,
        }
    deltas = (trend or {}).get("per_class_replaced_rate_delta", {})
    classes = [
        {"name": row["name"], "rows": row["rows"], "replaced": row["replaced"],
         "rate": _fmt(row["replaced_rate"], pct=True), "lcb": _fmt(row["replaced_rate_lcb"], pct=True),
         "received": report["per_class"][str(row["class"])]["received"],
         "change": _fmt_delta(deltas.get(str(row["class"])))}
        for row in report["most_replaced"][:20]
    ]

    cols = [c for c in IMAGE_COLUMNS if c in table.column_names]
    images = table.select(cols).take(pa.array(chosen, type=pa.int64())) if cols and len(chosen) else None
    samples = []
    for j, s in enumerate(report["suspicious"]):
        pair = [(caption, _png_data_uri(images.column(col)[j].as_py()) if images is not None and col in cols else None)
                for col, caption in (("image_orig_png", "before"), ("image_png", "after"))]
        samples.append({
            "images": pair, "key": str(s["key"]), "score": _fmt(s["flag_score"]),
            "pred_orig": report["class_names"].get(str(s["pred_orig"]), str(s["pred_orig"])),
            "pred_purified": report["class_names"].get(str(s["pred_purified"]), str(s["pred_purified"])),
            "label": str(s["label"]), "shard": str(s["shard"]),
        })

    return _template().render(
        generated_at=str(report["generated_at"]),
        sample=_describe_sample(report.get("sample")),
        methods=", ".join(f"{k} ({v})" for k, v in report["methods"].items()),
        cards=cards,
        alerts=report["alerts"],
        thresholds=json.dumps(report["thresholds"], sort_keys=True) if report.get("thresholds") else None,
        trend=trend_view,
        class_chart=_class_chart(report, previous),
        classes=classes,
        heatmap=_heatmap(report),
        has_original_images=report["has_original_images"],
        samples=samples,
        top_errors=list(report["top_errors"].items()),
    )


def _describe_sample(sample: dict | None) -> str | None:
    if not sample or sample.get("fraction") is None:
        return f"the first {sample['limit']} rows read" if sample and sample.get("limit") else None
    text = f"rows whose key hashes below {sample['fraction']:.4g} (seed {sample['seed']})"
    if sample.get("source_rows"):
        text = f"about {sample['rows_asked']} of {sample['source_rows']} source rows: " + text
    return text + (f", at most {sample['limit']}" if sample.get("limit") else "")


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def build_report(
    table: pa.Table,
    out_dir: Path,
    previous: dict | None = None,
    thresholds: Thresholds | dict | None = None,
    class_names: list[str] | None = None,
    top_k: int = 16,
    sample: dict | None = None,
    sink_check: Mapping[str, Any] | None = None,
) -> dict:
    """Compute the audit numbers from the pipeline output, write `report.json` and `report.html` into `out_dir`.

    `previous` is the previous run's report.json (as a dict) for the trend section; `thresholds` (a Thresholds, or
    a dict of its keys: THRESHOLD_KEYS) fill `report["alerts"]`, which the CLI turns into a non-zero exit.
    `sample` records how the audited rows were drawn from the source (the audit's own description, kept as is).
    `sink_check` (the job's `sink_check` settings, None: off) looks for a class that absorbs many others
    (pipeline/flows.py): each one found is an alert whatever the thresholds, since it voids the purified labels.
    """
    # Before any work: a typo or a broken previous report should not cost a full report run.
    checked = parse_thresholds(thresholds)
    if previous is not None:
        check_previous(previous)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary, chosen = _summarize(table, class_names, top_k)
    report: dict[str, Any] = {
        "version": REPORT_VERSION,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **summary,
        "sample": sample,
    }
    report["trend"] = _trend(report, previous) if previous else None
    report["thresholds"] = checked.as_dict()
    report["alerts"] = evaluate_thresholds(report, checked)
    sinks = sinks_in_table(table, **sink_check) if sink_check is not None else []
    report["sinks"] = [sink.as_dict() for sink in sinks]
    report["alerts"] += [f"{sink.describe()}: {SINK_MEANING}" for sink in sinks]
    report = _json_safe(report)
    # Names, not paths: the same report.json is copied to object storage (audit.report_uri), next to its page.
    report["files"] = {"json": "report.json", "html": "report.html"}

    page = _render_html(report, table, chosen, previous)  # rendered first: a failure leaves no half-written pair
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=False))
    (out_dir / "report.html").write_text(page, encoding="utf-8")
    return report
