"""The output table: one Parquet row per input image, written by Ray Data's own Parquet sink.

Output columns (``OUTPUT_SCHEMA``; the two optional ones are added by :func:`output_schema`):

=================  ===========  ============================================================================
column             type         meaning
=================  ===========  ============================================================================
``key``            string       unique row key from the source (Parquet key, ``shard/__key__``, relative path)
``shard``          string       the source file the row came from
``label``          int64, null  the source's ground-truth label; null when the source has none
``image_png``      binary, null the purified image as PNG (what a downstream trainer should use); null on error
``pred_orig``      int64, null  black-box top-1 class on the original image
``score_orig``     float, null  black-box top-1 probability on the original image
``pred_purified``  int64, null  black-box top-1 class on the purified image: the defended label
``score_purified`` float, null  black-box top-1 probability on the purified image
``flagged``        bool, null   ``pred_orig != pred_purified``: purification changed the answer, a likely trigger
``flag_score``     float, null  how strongly the row is suspected (method-specific, higher = more suspicious)
``method``         string       purification method (``zip``, ``sampdetox``, ``sdedit``, ``cascade``, ...)
``params``         string       the method's parameters as canonical JSON (sorted keys)
``nfe``            float        diffusion network evaluations spent on this row (0 when nothing ran)
``error``          string, null why the row has no result (bad image, black-box failure); null when fine
``retryable``      bool, null   on an error row: the cause can pass by itself (black box down or slow, query
                                budget, credentials, a failed purify batch), so the next run retries the row; false when
                                the row's own data failed (undecodable, too large), which no rerun can fix
``image_orig_png`` binary, null optional (``keep_orig``): the decoded, size-normalised original as PNG
native id column   as read      optional: the reader's id column used for resume when it is not ``key``
                                (``path`` for image folders, ``sample_id`` for WebDataset, ``row_hash`` or the
                                Parquet key column)
=================  ===========  ============================================================================

On an error row every result column (images, predictions, scores, flags) is null, so a reader never mistakes the
placeholder zeros of a failed decode for a result.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.decode import encode_png, is_empty_error

OUTPUT_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("label", pa.int64()),
    pa.field("image_png", pa.binary()),
    pa.field("pred_orig", pa.int64()),
    pa.field("score_orig", pa.float32()),
    pa.field("pred_purified", pa.int64()),
    pa.field("score_purified", pa.float32()),
    pa.field("flagged", pa.bool_()),
    pa.field("flag_score", pa.float32()),
    pa.field("method", pa.string(), nullable=False),
    pa.field("params", pa.string(), nullable=False),
    pa.field("nfe", pa.float32(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("retryable", pa.bool_()),
])
ORIG_IMAGE_FIELD = pa.field("image_orig_png", pa.binary())

# Input names accepted for the images, first match wins: ready PNG bytes, else a uint8 (N, C, H, W) array.
PURIFIED_INPUTS = ("image_png", "purified")
ORIGINAL_INPUTS = ("image_orig_png", "image")


def output_schema(
    keep_orig: bool = False, id_column: str | None = None, id_type: pa.DataType | None = None
) -> pa.Schema:
    """OUTPUT_SCHEMA plus ``image_orig_png`` (when ``keep_orig``) and the reader-native id column (when not key)."""
    schema = OUTPUT_SCHEMA
    if keep_orig:
        schema = schema.append(ORIG_IMAGE_FIELD)
    if id_column and id_column not in schema.names:
        schema = schema.append(pa.field(id_column, id_type or pa.string()))
    return schema


def _strings(values: Any, n: int, name: str) -> list[str]:
    out = [None if v is None else str(v) for v in _list(values, n)]
    if any(v is None for v in out):
        raise ValueError(f"column {name!r} must not contain nulls")
    return out


def _list(values: Any, n: int) -> list:
    if values is None:
        return [None] * n
    if isinstance(values, (str, bytes, Mapping)) or np.isscalar(values):
        return [values] * n
    out = values.tolist() if isinstance(values, np.ndarray) else list(values)
    if len(out) != n:
        raise ValueError(f"column has {len(out)} values for {n} rows")
    return out


def _ints(values: Any, n: int, bad: np.ndarray) -> pa.Array:
    """Integers where negative (our 'none' marker) or a bad row -> null."""
    if values is None:
        return pa.nulls(n, pa.int64())
    arr = np.asarray([(-1 if v is None else v) for v in _list(values, n)], dtype=np.int64)
    return pa.array(arr, type=pa.int64(), mask=(arr < 0) | bad)


def _floats(values: Any, n: int, bad: np.ndarray) -> pa.Array:
    if values is None:
        return pa.nulls(n, pa.float32())
    arr = np.asarray([(np.nan if v is None else v) for v in _list(values, n)], dtype=np.float32)
    return pa.array(arr, type=pa.float32(), mask=np.isnan(arr) | bad)


def _pngs(batch: Mapping[str, Any], names: Sequence[str], n: int, bad: np.ndarray) -> pa.Array:
    for name in names:
        if name in batch and batch[name] is not None:
            values = batch[name]
            if isinstance(values, np.ndarray) and values.dtype == np.uint8 and values.ndim == 4:
                good = np.flatnonzero(~bad)
                encoded = encode_png(values[good]) if len(good) else []
                pngs: list[bytes | None] = [None] * n
                for i, png in zip(good.tolist(), encoded, strict=True):
                    pngs[i] = png
                return pa.array(pngs, type=pa.binary())
            listed = _list(values, n)
            return pa.array([None if b else v for v, b in zip(listed, bad.tolist(), strict=True)], type=pa.binary())
    return pa.nulls(n, pa.binary())


def _params_json(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8")
    if isinstance(value, str):
        return value
    return json.dumps(value if value is not None else {}, sort_keys=True, separators=(",", ":"), default=str)


def to_output_batch(
    batch: Mapping[str, Any],
    *,
    method: str | None = None,
    params: Mapping[str, Any] | str | None = None,
    keep_orig: bool = False,
    id_column: str | None = None,
) -> pa.Table:
    """Turn a finished batch (dict of numpy arrays or lists, as ``map_batches(batch_format="numpy")`` passes it)
    into a table of :func:`output_schema`.

    Reads: ``key``, ``shard`` (required); ``label`` (-1 = none); ``image_png`` (PNG bytes) or ``purified``
    (uint8 N,C,H,W); ``pred_orig``/``pred_purified`` (-1 = none); ``score_orig``/``score_purified``/``flag_score``
    (NaN = none); ``flagged`` (else computed from the two predictions); ``method``/``params``/``nfe`` (columns, or
    the keyword defaults); ``error`` (str | None); with ``keep_orig``, ``image_orig_png`` or ``image`` (uint8);
    ``id_column`` is copied through with its own type.
    """
    n = len(batch["key"])
    errors = [None if is_empty_error(e) else str(e)
              for e in _list(batch.get("error"), n)]
    bad = np.array([e is not None for e in errors], dtype=bool)
    pred_orig = _ints(batch.get("pred_orig"), n, bad)
    pred_purified = _ints(batch.get("pred_purified"), n, bad)
    if batch.get("flagged") is not None:
        flags = [None if f is None else bool(f) for f in _list(batch["flagged"], n)]
        flagged = pa.array(flags, type=pa.bool_(), mask=bad | np.array([f is None for f in flags], dtype=bool))
    else:
        # Null stays null: a flag needs both answers.
        flagged = pc.not_equal(pred_orig, pred_purified)
    method_values = batch.get("method") if batch.get("method") is not None else method
    if method_values is None:
        raise ValueError("no method: pass method= or a 'method' column")
    params_values = batch.get("params") if batch.get("params") is not None else params
    if isinstance(params_values, Mapping) or params_values is None or isinstance(params_values, str):
        params_values = [_params_json(params_values)] * n
    else:
        params_values = [_params_json(p) for p in _list(params_values, n)]
    nfe_values = batch.get("nfe")
    nfe = np.asarray(_list(0.0 if nfe_values is None else nfe_values, n), dtype=np.float32)
    columns: dict[str, pa.Array] = {
        "key": pa.array(_strings(batch["key"], n, "key"), type=pa.string()),
        "shard": pa.array(_strings(batch["shard"], n, "shard"), type=pa.string()),
        "label": _ints(batch.get("label"), n, np.zeros(n, dtype=bool)),
        "image_png": _pngs(batch, PURIFIED_INPUTS, n, bad),
        "pred_orig": pred_orig,
        "score_orig": _floats(batch.get("score_orig"), n, bad),
        "pred_purified": pred_purified,
        "score_purified": _floats(batch.get("score_purified"), n, bad),
        "flagged": flagged,
        "flag_score": _floats(batch.get("flag_score"), n, bad),
        "method": pa.array(_strings(method_values, n, "method"), type=pa.string()),
        "params": pa.array(params_values, type=pa.string()),
        "nfe": pa.array(np.nan_to_num(nfe, nan=0.0), type=pa.float32()),
        "error": pa.array(errors, type=pa.string()),
        "retryable": pa.array([bool(r) if e is not None else None
                               for e, r in zip(errors, _list(batch.get("retryable", False), n))], type=pa.bool_()),
    }
    if keep_orig:
        columns["image_orig_png"] = _pngs(batch, ORIGINAL_INPUTS, n, bad)
    id_type = pa.string()
    if id_column and id_column not in columns:
        if id_column not in batch:
            raise ValueError(f"id column {id_column!r} missing from the batch: it must flow through every stage")
        values = batch[id_column]
        # From numpy directly where possible: row_hash is uint64, beyond what a Python-int round trip infers.
        native = pa.array(values) if isinstance(values, np.ndarray) and values.dtype != object else pa.array(
            _list(values, n))
        if pa.types.is_null(native.type):  # an empty or all-null batch says nothing about the type: ids are text
            native = native.cast(pa.string())
        id_type = native.type
        columns[id_column] = native
    schema = output_schema(keep_orig, id_column if id_column in columns else None, id_type)
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)
