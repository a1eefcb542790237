"""Parquet shards: one binary image column, optional key and label columns, read by Ray's Parquet reader.

Keys: the key column when the files have one (a null key becomes a ``missing key`` error row with a stand-in id),
else ``{shard}:{row_index}`` recovered from Ray's row hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.sources.base import (
    DEFAULT_MAX_IMAGE_BYTES,
    SourceError,
    SourceInfo,
    SourceSpec,
    _as_binary,
    _cap_images,
    _labels,
    _relative_array,
    list_shards,
)
from pipeline.storage import describe

if TYPE_CHECKING:
    import ray.data

# Row hashes that decode to a row index beyond this mean Ray changed its hash; keys then fall back to the hash.
_MAX_PLAUSIBLE_ROW = 1 << 40

# The columns Ray's Parquet reader adds (include_paths, include_row_hash), over any file column of the same name.
_READER_COLUMNS = ("path", "row_hash")

_FOOTER_THREADS = 32  # footers read at once by inspect: object stores answer many small reads in parallel


def inspect(spec: SourceSpec, fs: pafs.FileSystem, root: str) -> SourceInfo:
    """Access, shards, and every shard's schema (footers only): image, key and label columns and their types, and
    the schema the read asks every shard for (``SourceInfo.read_schema``)."""
    for option, name in (("image_column", spec.image_column), ("key_column", spec.key_column),
                         ("label_column", spec.label_column)):
        if name in _READER_COLUMNS:
            # Ray's reader adds (and overwrites) these; selecting the name twice would fail the plan after preflight
            raise SourceError(
                f"source.{option} {name!r} is also a column Ray's Parquet reader adds ({', '.join(_READER_COLUMNS)}): "
                "rename the column in the shards" + (", or set key_column to None to use file:row keys"
                                                     if option == "key_column" else "")
            )
    info = SourceInfo(root=root, shards=list_shards(spec, fs))
    footers = _footers(fs, info.shards)
    info.shard_rows = [rows for _, rows in footers]
    # Each column is judged by the first shard that has it: a first shard that lacks one (or holds it all null)
    # must not decide for the others, whose rows would lose their labels or keys.
    refs = {c: _first_with(info.shards, footers, c) for c in (spec.image_column, spec.key_column, spec.label_column)
            if c}
    if refs[spec.image_column] is None:
        first, (schema, _) = info.shards[0], footers[0]
        raise SourceError(
            f"image column {spec.image_column!r} not found in any of the {len(info.shards)} shard(s) under "
            f"{describe(fs, root)} (columns of {describe(fs, first)}: {', '.join(schema.names)})"
        )
    shard, image_type = refs[spec.image_column]
    _check_image_type(spec, fs, shard, image_type)
    if spec.label_column and refs[spec.label_column] is not None:
        shard, label_type = refs[spec.label_column]
        if not pa.types.is_integer(label_type):
            raise SourceError(
                f"label column {spec.label_column!r} in {describe(fs, shard)} has type {label_type}; expected "
                "integers (set label_column to another name or None to ignore it)"
            )
        info.has_label = True
    if spec.key_column and refs[spec.key_column] is not None:
        shard, key_type = refs[spec.key_column]
        _check_key_type(spec, fs, shard, key_type)
        info.has_key = True
        info.id_column = spec.key_column
    else:
        info.id_column = "row_hash"
    info.read_schema = _read_schema(spec, fs, info, footers, refs)
    return info


def _footers(fs: pafs.FileSystem, shards: list[str]) -> list[tuple[pa.Schema, int]]:
    """Every shard's schema and row count, read in parallel (object stores answer many small reads at once)."""
    if len(shards) == 1:
        return [_shard_footer(fs, shards[0])]
    with ThreadPoolExecutor(min(_FOOTER_THREADS, len(shards))) as pool:
        return list(pool.map(lambda shard: _shard_footer(fs, shard), shards))


def _first_with(shards: list[str], footers: list[tuple[pa.Schema, int]],
                column: str) -> tuple[str, pa.DataType] | None:
    """The first shard holding `column` with a type (not absent, not all null), and that type."""
    for shard, (schema, _) in zip(shards, footers, strict=True):
        index = schema.get_field_index(column)
        if index >= 0 and not pa.types.is_null(schema.field(index).type):
            return shard, schema.field(index).type
    return None


def _shard_footer(fs: pafs.FileSystem, shard: str) -> tuple[pa.Schema, int]:
    """A shard's schema and row count, from its footer alone."""
    try:
        with pq.ParquetFile(shard, filesystem=fs) as f:
            return f.schema_arrow, f.metadata.num_rows
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot read the Parquet schema of {describe(fs, shard)}: {e}") from e


def _check_image_type(spec: SourceSpec, fs: pafs.FileSystem, shard: str, image_type: pa.DataType) -> None:
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
            or pa.types.is_binary_view(image_type)):
        raise SourceError(
            f"image column {spec.image_column!r} in {describe(fs, shard)} has type {image_type}; expected binary "
            "(encoded PNG/JPEG/WebP bytes)"
        )


def _check_key_type(spec: SourceSpec, fs: pafs.FileSystem, shard: str, key_type: pa.DataType) -> None:
    if spec.key_column == "key" and not (pa.types.is_string(key_type) or pa.types.is_large_string(key_type)):
        # The resume filter compares the reader's ids with the written ones, so the native column must keep
        # its type; a non-string column called "key" would collide with the normalised string key.
        raise SourceError(
            f"key column 'key' in {describe(fs, shard)} has type {key_type}; a column named 'key' must hold "
            "strings (rename it, or set key_column to None to use file:row keys)"
        )
    if not (pa.types.is_string(key_type) or pa.types.is_large_string(key_type) or pa.types.is_integer(key_type)):
        # a null key gets a stand-in id of the column's own type (see _fill_missing_keys): text or integers
        raise SourceError(
            f"key column {spec.key_column!r} in {describe(fs, shard)} has type {key_type}; a key column must "
            "hold strings or integers (or set key_column to None to use file:row keys)"
        )
    if key_type == pa.uint64():
        # Integer keys travel as int64 (_fill_missing_keys): one past 2**63 would fail every block it is in, and
        # wrapping it would collide with the negative stand-ins of null keys.
        raise SourceError(
            f"key column {spec.key_column!r} in {describe(fs, shard)} has type uint64, which int64 ids cannot hold: "
            "cast the column to int64 or string, or set key_column to None to use file:row keys"
        )


def _read_schema(spec: SourceSpec, fs: pafs.FileSystem, info: SourceInfo, footers: list[tuple[pa.Schema, int]],
                 refs: dict[str, tuple[str, pa.DataType] | None]) -> pa.Schema:
    """The image, key and label columns with one type each that every shard's column casts to; given to the read,
    so that a shard lacking a column reads it as nulls (a ``missing key`` / ``missing image`` error row, label -1)
    instead of failing its read task. A shard whose column types do not fit those of the first shard holding the
    column is refused here, named, before any work (Ray would otherwise fail the job on it, or on a later shard than
    its schema sample reaches, mid-way)."""
    columns = [spec.image_column]
    columns += [spec.key_column] if info.has_key else []
    columns += [spec.label_column] if info.has_label else []
    schemas = [schema for schema, _ in footers]
    types: dict[str, list[pa.DataType]] = {c: [] for c in columns}
    for shard, schema in zip(info.shards, schemas, strict=True):
        for column in columns:
            index = schema.get_field_index(column)
            column_type = schema.field(index).type if index >= 0 else pa.null()
            if pa.types.is_null(column_type):
                continue  # absent or all null: read as nulls
            if column == spec.image_column:
                _check_image_type(spec, fs, shard, column_type)
            elif column == spec.key_column:
                _check_key_type(spec, fs, shard, column_type)
            if column == spec.label_column:  # any numbers: what is no class id reads as -1 (see _labels)
                fits = pa.types.is_integer(column_type) or pa.types.is_floating(column_type)
            else:
                fits = _type_kind(column_type) == _type_kind(refs[column][1])
            if not fits:
                ref_shard, ref_type = refs[column]
                raise SourceError(
                    f"the Parquet shards under {describe(fs, info.root)} disagree on a column's type: {column!r} is "
                    f"{column_type} in {describe(fs, shard)} but {ref_type} in {describe(fs, ref_shard)}; rewrite "
                    "the odd shards with that shard's types, or point source.uri at one kind"
                )
            types[column].append(column_type)
    fields = []
    for column in columns:
        present = set(types[column])  # the type of the first shard holding it at least (see inspect)
        if len(present) == 1:
            column_type = present.pop()
        elif column == spec.image_column:
            column_type = pa.large_binary()
        elif column == spec.key_column:
            column_type = pa.int64() if _type_kind(next(iter(present))) == "integer" else pa.large_string()
        elif all(pa.types.is_signed_integer(t) or (pa.types.is_unsigned_integer(t) and t.bit_width < 64)
                 for t in present):
            column_type = pa.int64()
        else:
            # unsigned 64-bit or float labels beside others: text holds every value, _labels reads each one
            column_type = pa.string()
        fields.append(pa.field(column, column_type))
    return pa.schema(fields)


def _type_kind(t: pa.DataType) -> str:
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "text"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "binary"
    return str(t)


def reader(spec: SourceSpec, fs: pafs.FileSystem, info: SourceInfo
           ) -> tuple[ray.data.Dataset, Callable[..., pa.Table], dict[str, Any]]:
    import ray.data

    # At least one read task per shard: Ray would pack small shards into one task and so one block, and then
    # the whole dataset moves through purify and lands in the output as a single late write.
    # The row hash also with a key column: it names a row whose key is null (see _fill_missing_keys).
    # The schema inspect checked every shard against, so that no shard's own schema decides the columns or types.
    ds = ray.data.read_parquet(info.shards, filesystem=fs, schema=info.read_schema, include_paths=True,
                               include_row_hash=True, override_num_blocks=len(info.shards))
    columns = [spec.image_column, "path"]
    columns += [spec.key_column, "row_hash"] if info.has_key else ["row_hash"]
    columns += [spec.label_column] if info.has_label else []
    # Projection is pushed into the reader: other (maybe large) columns are never fetched.
    ds = ds.select_columns(columns)
    return ds, _normalise_parquet, {
        "root": info.root, "image_column": spec.image_column,
        "key_column": spec.key_column if info.has_key else None,
        "label_column": spec.label_column if info.has_label else None, "max_image_bytes": spec.max_image_bytes,
    }


# --- per-block normalisation (runs in Ray workers) ------------------------------------------------------------------

def _row_index(paths: list[str], row_hash: np.ndarray) -> np.ndarray:
    """Invert Ray's ``row_hash`` (md5(path) seed + row position, through the splitmix64 finaliser) to the row's
    position in its file, so that keyless Parquet rows get readable ``file:row`` keys. Any inverse of a bijection
    keeps distinct hashes distinct, so keys stay unique even if Ray ever changes the formula."""
    x = row_hash.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= (x >> np.uint64(31)) ^ (x >> np.uint64(62))
        x *= np.uint64(0x319642B2D24D8EC3)
        x ^= (x >> np.uint64(27)) ^ (x >> np.uint64(54))
        x *= np.uint64(0x96DE1B173F119089)
        x ^= (x >> np.uint64(30)) ^ (x >> np.uint64(60))
        seeds: dict[str, np.uint64] = {}
        for p in set(paths):
            seeds[p] = np.uint64(int.from_bytes(hashlib.md5(p.encode("utf-8")).digest()[:8], "little"))
        x -= np.array([seeds[p] for p in paths], dtype=np.uint64)
    return x


def _fill_missing_keys(
    keys: pa.ChunkedArray | pa.Array, paths: pa.ChunkedArray | pa.Array, row_hash: pa.ChunkedArray | pa.Array
) -> tuple[pa.Array, np.ndarray]:
    """A null Parquet key -> a stand-in of the column's type, the same in the reader's checkpoint filter and in the
    normaliser: ``{shard path}:{row}`` for text, a negative id drawn from Ray's row hash for integers (real keys
    are rarely negative 62-bit numbers). Returns the filled column and where it was null."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    if pa.types.is_integer(keys.type):
        keys = keys.cast(pa.int64())  # one type in every block, whether or not it had a null to fill
    missing = keys.is_null().to_numpy(zero_copy_only=False)
    if not missing.any():
        return keys, missing
    hashes = np.asarray(row_hash.to_numpy(), dtype=np.uint64)
    if pa.types.is_integer(keys.type):
        stand_in = -(hashes & np.uint64((1 << 62) - 1)).astype(np.int64) - 1
        values = np.where(missing, stand_in, keys.fill_null(0).to_numpy())
        return pa.array(values, type=pa.int64()), missing
    path_list = paths.to_pylist()
    rows = _row_index(path_list, hashes)
    values = keys.to_pylist()
    for i in np.flatnonzero(missing).tolist():
        row = int(rows[i])
        values[i] = f"{path_list[i]}:{row}" if row < _MAX_PLAUSIBLE_ROW else f"{path_list[i]}:h{int(hashes[i]):016x}"
    return pa.array(values, type=keys.type), missing


def _normalise_parquet(
    table: pa.Table, root: str, image_column: str, key_column: str | None, label_column: str | None,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> pa.Table:
    n = table.num_rows
    paths = table["path"].to_pylist()
    names = _relative_array(table["path"], root)
    errors: list[str | None] = [None] * n
    if key_column is not None:
        native_values, missing = _fill_missing_keys(table[key_column], table["path"], table["row_hash"])
        for i in np.flatnonzero(missing).tolist():
            errors[i] = f"missing key (column {key_column!r} is null)"
        keys = pc.cast(native_values, pa.string())
        native = [(key_column, native_values)] if key_column != "key" else []
    else:
        hashes = table["row_hash"].to_numpy()
        rows = _row_index(paths, hashes)
        keys = pa.array([
            f"{name}:{row}" if row < _MAX_PLAUSIBLE_ROW else f"{name}:h{h:016x}"
            for name, row, h in zip(names, rows.tolist(), hashes.tolist(), strict=True)
        ], type=pa.string())
        native = [("row_hash", table["row_hash"])]
    images = _cap_images(_as_binary(table[image_column]), errors, max_image_bytes)
    columns = {
        "key": keys,
        "shard": table["path"],
        "image_bytes": images,
        "label": _labels(table[label_column] if label_column else None, n),
        "error": pa.array(errors, type=pa.string()),
    }
    columns.update(native)
    return pa.table(columns)
