"""Image sources: Parquet, WebDataset and image-folder shards on any pyarrow filesystem, read by Ray Data's own readers.

Every source comes out of :func:`read_source` as rows with the same columns, produced by one cheap per-block map
fused into the read tasks:

``key`` (str)
    Unique row key. Parquet: the key column when the files have one, else ``{shard}:{row_index}``. WebDataset:
    ``{shard}/{__key__}``. Image folder: the path relative to the root. ``{shard}`` is the shard's path relative to
    the source root (its base name for a flat layout).
``shard`` (str)
    Path of the file the row came from, as the filesystem spells it (``bucket/prefix/...`` on S3).
``image_bytes`` (binary)
    The encoded image, untouched (null when a WebDataset sample has no image member).
``label`` (int64)
    The ground-truth label, ``-1`` when the source has none.
``error`` (string, null when fine)
    Why the row cannot be used, decided at the read: ``missing key`` (a null in the Parquet key column), ``image
    too large`` (a cell or tar member past ``max_image_bytes``, never read or passed on), ``members of sample ...
    not contiguous`` (WebDataset). Decode keeps it, so each such row becomes an error row instead of a failed read.
the reader-native id column (see :func:`id_column`)
    Kept as the reader produced it, because Ray Data's checkpointed resume filters rows on that column right after
    the read and finds the finished ids in the output: ``path`` (image folder), the Parquet key column when it is
    not called ``key``, ``row_hash`` (Parquet without a key column), or ``sample_id`` (WebDataset: ``__url__/__key__``,
    computed from two reader columns by :class:`SourceCheckpointFilter`, since ``__key__`` alone repeats across
    shards). WebDataset rows also keep ``__key__``.

Nothing but file listings and one schema/header probe happens on the driver; rows stream through Ray.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.block import BlockAccessor
from ray.data.checkpoint import CheckpointConfig
from ray.data.checkpoint.checkpoint_filter import NumpyArrayBasedCheckpointFilter

from pipeline.storage import StorageError, check_readable, describe, resolve_filesystem, uri_path

if TYPE_CHECKING:
    import ray.data

FORMATS = ("parquet", "webdataset", "imagefolder")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
_SHARD_EXTENSIONS = {"parquet": ("parquet",), "webdataset": ("tar",), "imagefolder": IMAGE_EXTENSIONS}
# WebDataset members read as the label besides the configured label column name.
_WDS_LABEL_MEMBERS = ("cls", "label", "class")
# How many tar members of the first WebDataset shard to look at for an image before giving up.
_WDS_PROBE_MEMBERS = 64
# Row hashes that decode to a row index beyond this mean Ray changed its hash; keys then fall back to the hash.
_MAX_PLAUSIBLE_ROW = 1 << 40
# Largest encoded image (Parquet cell, tar member, image file) passed on from the read: bigger ones become error
# rows there, and tar members are not even read. The same order as decode's own byte limit.
DEFAULT_MAX_IMAGE_BYTES = 32 * 1024 * 1024

NORMALISED_COLUMNS = ("key", "shard", "image_bytes", "label")
WDS_ID_COLUMN = "sample_id"


class SourceError(StorageError):
    """The source exists but cannot be used as configured (no shards, wrong columns, unreadable first shard)."""


@dataclass(frozen=True)
class SourceSpec:
    """Where the images are and how to read them.

    ``uri``: a directory (scanned recursively for shards) or one shard, local or ``s3://bucket/prefix``.
    ``format``: ``parquet`` | ``webdataset`` | ``imagefolder``.
    ``image_column`` / ``key_column`` / ``label_column``: Parquet column names (``label_column`` also names the
    WebDataset label member besides ``cls``); key and label columns are optional in the data, ``None`` ignores them.
    ``endpoint_url``: S3-compatible endpoint (else env ``S3_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL``).
    ``limit``: read at most this many rows (applied after the read, so with a resumed job it counts new rows).
    """

    uri: str
    format: str = "parquet"
    image_column: str = "image"
    key_column: str | None = "key"
    label_column: str | None = "label"
    endpoint_url: str | None = None
    limit: int | None = None
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown source format {self.format!r}; expected one of {', '.join(FORMATS)}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if self.max_image_bytes < 1:
            raise ValueError(f"max_image_bytes must be >= 1, got {self.max_image_bytes}")


@dataclass
class SourceInfo:
    """What validation learned about a source; everything read_source needs besides the filesystem."""

    root: str
    shards: list[str] = field(default_factory=list)
    has_key: bool = False
    has_label: bool = False
    classes: list[str] = field(default_factory=list)
    id_column: str | None = None


def _filesystem(spec: SourceSpec, fs: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    if fs is None:
        return resolve_filesystem(spec.uri, spec.endpoint_url)
    # The caller's filesystem wins; only the path is taken from the URI (no second client is built).
    return fs, uri_path(spec.uri)


def _skipped(relative: str) -> bool:
    # Same convention as Ray's directory expansion, applied to every path component so that checkpoint or
    # temporary folders (_checkpoint/, .cache/) inside a source tree are never read as shards.
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


def _has_extension(path: str, extensions: tuple[str, ...]) -> bool:
    return path.lower().rsplit(".", 1)[-1] in extensions if "." in posixpath.basename(path) else False


def list_shards(spec: SourceSpec, fs: pafs.FileSystem | None = None) -> list[str]:
    """Sorted shard paths of a source (image files for ``imagefolder``); raises SourceError when there are none.

    Access problems (missing bucket or path, credentials, endpoint) raise StorageError from the access check.
    """
    fs, root = _filesystem(spec, fs)
    info = check_readable(fs, root)
    extensions = _SHARD_EXTENSIONS[spec.format]
    if info.type == pafs.FileType.File:
        if spec.format == "imagefolder":
            raise SourceError(f"imagefolder source must be a directory, got the file {describe(fs, root)}")
        return [root]
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as e:
        raise StorageError(f"cannot list {describe(fs, root)}: {e}") from e
    prefix = root.rstrip("/") + "/"
    shards = sorted(
        i.path for i in infos
        if i.type == pafs.FileType.File
        and _has_extension(i.path, extensions)
        and not _skipped(i.path[len(prefix):] if i.path.startswith(prefix) else posixpath.basename(i.path))
    )
    if not shards:
        raise SourceError(
            f"no {spec.format} shards (*.{' / *.'.join(extensions)}) under {describe(fs, root)}"
        )
    return shards


def _list_classes(fs: pafs.FileSystem, root: str) -> list[str]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    except OSError as e:
        raise StorageError(f"cannot list {describe(fs, root)}: {e}") from e
    return sorted(
        posixpath.basename(i.path.rstrip("/")) for i in infos
        if i.type == pafs.FileType.Directory and not _skipped(posixpath.basename(i.path.rstrip("/")))
    )


def _inspect_parquet(fs: pafs.FileSystem, spec: SourceSpec, info: SourceInfo) -> None:
    first = info.shards[0]
    try:
        schema = pq.read_schema(first, filesystem=fs)
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot read the Parquet schema of {describe(fs, first)}: {e}") from e
    names = schema.names
    if spec.image_column not in names:
        raise SourceError(
            f"image column {spec.image_column!r} not found in {describe(fs, first)} (columns: {', '.join(names)})"
        )
    image_type = schema.field(spec.image_column).type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
            or pa.types.is_binary_view(image_type)):
        raise SourceError(
            f"image column {spec.image_column!r} in {describe(fs, first)} has type {image_type}; expected binary "
            "(encoded PNG/JPEG/WebP bytes)"
        )
    if spec.label_column and spec.label_column in names:
        label_type = schema.field(spec.label_column).type
        if not pa.types.is_integer(label_type):
            raise SourceError(
                f"label column {spec.label_column!r} in {describe(fs, first)} has type {label_type}; expected "
                "integers (set label_column to another name or None to ignore it)"
            )
        info.has_label = True
    if spec.key_column and spec.key_column in names:
        key_type = schema.field(spec.key_column).type
        if spec.key_column == "key" and not (pa.types.is_string(key_type) or pa.types.is_large_string(key_type)):
            # The resume filter compares the reader's ids with the written ones, so the native column must keep
            # its type; a non-string column called "key" would collide with the normalised string key.
            raise SourceError(
                f"key column 'key' in {describe(fs, first)} has type {key_type}; a column named 'key' must hold "
                "strings (rename it, or set key_column to None to use file:row keys)"
            )
        if not (pa.types.is_string(key_type) or pa.types.is_large_string(key_type) or pa.types.is_integer(key_type)):
            # a null key gets a stand-in id of the column's own type (see _fill_missing_keys): text or integers
            raise SourceError(
                f"key column {spec.key_column!r} in {describe(fs, first)} has type {key_type}; a key column must "
                "hold strings or integers (or set key_column to None to use file:row keys)"
            )
        info.has_key = True
        info.id_column = spec.key_column
    else:
        info.id_column = "row_hash"


def _inspect_webdataset(fs: pafs.FileSystem, spec: SourceSpec, info: SourceInfo) -> None:
    """Read the first members of the first shard: a clear error now beats a failed Ray task later."""
    first = info.shards[0]
    members = 0
    try:
        with fs.open_input_stream(first) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                members += 1
                if _has_extension(member.name, IMAGE_EXTENSIONS):
                    break
                if members >= _WDS_PROBE_MEMBERS:
                    members = -1
                    break
            else:
                members = -1
    except (OSError, tarfile.TarError, EOFError) as e:
        raise SourceError(f"cannot read the WebDataset shard {describe(fs, first)} as a tar file: {e}") from e
    if members < 0:
        raise SourceError(
            f"no image member (*.{' / *.'.join(IMAGE_EXTENSIONS)}) among the first members of "
            f"{describe(fs, first)}"
        )
    info.id_column = WDS_ID_COLUMN


def inspect_source(spec: SourceSpec, fs: pafs.FileSystem | None = None) -> SourceInfo:
    """Validate a source before any Ray work: access, shards, and (Parquet) the first shard's schema or
    (WebDataset) the first shard's first members. Raises StorageError / SourceError with the file named."""
    fs, root = _filesystem(spec, fs)
    if spec.format == "imagefolder":
        # Only the top level is listed here: Ray lists the tree itself, and listing millions of objects twice is
        # what an image-folder source on S3 cannot afford.
        if check_readable(fs, root).type != pafs.FileType.Directory:
            raise SourceError(f"imagefolder source must be a directory: {describe(fs, root)}")
        return SourceInfo(root=root, classes=_list_classes(fs, root), id_column="path")
    info = SourceInfo(root=root, shards=list_shards(spec, fs))
    if spec.format == "parquet":
        _inspect_parquet(fs, spec, info)
    else:
        _inspect_webdataset(fs, spec, info)
    return info


def id_column(spec: SourceSpec, fs: pafs.FileSystem | None = None) -> str | None:
    """The reader-native unique column to give ``CheckpointConfig(id_column=...)`` for resumable jobs.

    Parquet: the key column when the files have it (its values must be unique, since resume skips an id it has
    seen: the job turns every row of a repeated key into a "duplicate key" error row, see
    :func:`mark_duplicate_keys`), else ``row_hash`` (Ray's deterministic hash of file path and row position,
    stable while the shards are not rewritten). Image folder: ``path``. WebDataset: ``sample_id`` =
    ``{__url__}/{__key__}``; Ray's own ``__key__`` repeats across shards (every shard may start at ``000000``),
    which would make a resumed job skip rows, so the id is composed from the shard path too. It needs
    :class:`SourceCheckpointFilter` as ``checkpoint_filter_cls``; :func:`checkpoint_config` sets both.
    """
    return inspect_source(spec, fs).id_column


def _wds_sample_ids(table: pa.Table) -> pa.Array:
    return pc.binary_join_element_wise(
        pc.cast(table["__url__"], pa.string()), pc.cast(table["__key__"], pa.string()), "/"
    )


class SourceCheckpointFilter(NumpyArrayBasedCheckpointFilter):
    """Ray's default checkpoint filter, made to take every block our readers produce.

    Ray 2.60's filter asserts Arrow blocks, but ``read_webdataset`` yields pandas blocks (a resumed WebDataset job
    dies with a bare AssertionError), so blocks are converted first. And the WebDataset id ``sample_id`` is
    computed here from ``__url__`` and ``__key__`` exactly as the normalising map computes it for the output.
    """

    def filter_rows_for_block(self, block: pa.Table) -> pa.Table:
        table = BlockAccessor.for_block(block).to_arrow()
        synthesized = self.id_column == WDS_ID_COLUMN and WDS_ID_COLUMN not in table.column_names
        if synthesized:
            table = table.append_column(WDS_ID_COLUMN, _wds_sample_ids(table))
        original = None
        if (self.id_column in table.column_names and table[self.id_column].null_count
                and {"path", "row_hash"} <= set(table.column_names)):
            # a null Parquet key: filter on the same stand-in id the normaliser writes, so a resumed run finds the
            # row done; the rows kept go on with the reader's own column, nulls included, for the normaliser to mark
            original = table[self.id_column]
            filled, _ = _fill_missing_keys(original, table["path"], table["row_hash"])
            table = table.set_column(table.column_names.index(self.id_column), self.id_column, filled)
            table = table.append_column("__row__", pa.array(np.arange(table.num_rows, dtype=np.int64)))
        out = super().filter_rows_for_block(table)
        if original is not None:
            out = out.set_column(out.column_names.index(self.id_column), self.id_column,
                                 original.take(out["__row__"])).drop_columns(["__row__"])
        return out.drop_columns([WDS_ID_COLUMN]) if synthesized else out


def checkpoint_config(
    spec: SourceSpec,
    checkpoint_path: str,
    fs: pafs.FileSystem | None = None,
    *,
    delete_checkpoint_on_success: bool = False,
) -> CheckpointConfig:
    """A ``CheckpointConfig`` for resuming a job over ``spec``: the right id column and the filter that reads it.

    ``checkpoint_path`` is a URI or local path, or with ``fs`` also a path inside it (``bucket/prefix``); ``fs``
    (else one resolved from the URI with the source's endpoint) is where Ray keeps the finished ids.
    """
    if fs is None:
        fs, path = resolve_filesystem(checkpoint_path, spec.endpoint_url)
    elif "://" in checkpoint_path or fs.type_name == "local":
        path = uri_path(checkpoint_path)
    else:  # already a path inside fs ("bucket/prefix"): uri_path would take it for a relative local path
        path = checkpoint_path.rstrip("/")
    return CheckpointConfig(
        id_column=id_column(spec), checkpoint_path=path, override_filesystem=fs,
        delete_checkpoint_on_success=delete_checkpoint_on_success, checkpoint_filter_cls=SourceCheckpointFilter,
    )


# More repeated keys than this means the column is no key at all: refuse rather than ship a huge set to every task.
MAX_DUPLICATE_KEYS = 100_000


def duplicate_keys(spec: SourceSpec, fs: pafs.FileSystem | None = None) -> dict[str, int]:
    """Keys that more than one row of a Parquet source carries, with how many rows carry each (``{}`` when every
    key is unique, or the source has no key column: its ``file:row`` keys, like image-folder paths, are unique).

    Reads the key column only, of every shard, on the caller (the same order of work and memory as Ray's
    checkpoint restore, which loads every finished id). Raises SourceError when more than MAX_DUPLICATE_KEYS
    distinct keys repeat.
    """
    fs, _ = _filesystem(spec, fs)
    info = inspect_source(spec, fs)
    if spec.format != "parquet" or not info.has_key:
        return {}
    import pyarrow.dataset as pads

    try:
        column = pads.dataset(info.shards, filesystem=fs, format="parquet").to_table(
            columns=[spec.key_column])[spec.key_column]
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot read the key column {spec.key_column!r} under {describe(fs, info.root)}: {e}"
                          ) from e
    counts = pc.value_counts(pc.cast(column, pa.string()))
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1)).to_pylist()
    dups = {d["values"]: int(d["counts"]) for d in repeated if d["values"] is not None}
    if len(dups) > MAX_DUPLICATE_KEYS:
        raise SourceError(
            f"{len(dups)} keys of column {spec.key_column!r} repeat under {describe(fs, info.root)}: it is not a "
            "key (set source.key_column to null for file:row keys)"
        )
    return dups


def mark_duplicate_keys(table: pa.Table, counts: dict[str, int]) -> pa.Table:
    """Per block, after the read: every row whose key repeats in the source gets the error
    ``duplicate key (N rows of the source have this key)``; decode keeps an error it finds, so each such row
    becomes an error row. All of them are kept (rows out == rows in), none is preferred: which one is "first"
    depends on read order, and a key that names two images cannot tie a result to one of them. Resume, keyed on
    the same ids, treats them alike too."""
    errors = [None if k is None or k not in counts else f"duplicate key ({counts[k]} rows of the source have this key)"
              for k in table["key"].to_pylist()]
    if "error" in table.column_names:  # a reason the read already found comes first
        errors = [old or new for old, new in zip(table["error"].to_pylist(), errors, strict=True)]
        table = table.drop_columns(["error"])
    return table.append_column("error", pa.array(errors, type=pa.string()))


def read_source(spec: SourceSpec, fs: pafs.FileSystem | None = None) -> ray.data.Dataset:
    """A streaming Ray Dataset of normalised rows (see the module docstring); validates the source first."""
    import ray.data

    fs, _ = _filesystem(spec, fs)
    info = inspect_source(spec, fs)
    if spec.format == "parquet":
        # At least one read task per shard: Ray would pack small shards into one task and so one block, and then
        # the whole dataset moves through purify and lands in the output as a single late write.
        # The row hash also with a key column: it names a row whose key is null (see _fill_missing_keys).
        ds = ray.data.read_parquet(info.shards, filesystem=fs, include_paths=True, include_row_hash=True,
                                   override_num_blocks=len(info.shards))
        columns = [spec.image_column, "path"]
        columns += [spec.key_column, "row_hash"] if info.has_key else ["row_hash"]
        columns += [spec.label_column] if info.has_label else []
        # Projection is pushed into the reader: other (maybe large) columns are never fetched.
        ds = ds.select_columns(columns)
        fn, kwargs = _normalise_parquet, {
            "root": info.root, "image_column": spec.image_column,
            "key_column": spec.key_column if info.has_key else None,
            "label_column": spec.label_column if info.has_label else None, "max_image_bytes": spec.max_image_bytes,
        }
    elif spec.format == "webdataset":
        ds = ray.data.read_datasource(
            _webdataset_datasource()(info.shards, max_member_bytes=spec.max_image_bytes, decoder=None, filesystem=fs),
            override_num_blocks=len(info.shards))
        fn, kwargs = _normalise_webdataset, {"root": info.root, "label_column": spec.label_column}
    else:
        ds = ray.data.read_binary_files(
            info.root, filesystem=fs, include_paths=True, file_extensions=list(IMAGE_EXTENSIONS)
        )
        fn, kwargs = _normalise_imagefolder, {"root": info.root, "classes": info.classes,
                                              "max_image_bytes": spec.max_image_bytes}
    if spec.limit is not None:
        ds = ds.limit(spec.limit)
    # batch_size=None maps whole blocks, so the map fuses into the read tasks at no extra copy.
    return ds.map_batches(fn, batch_format="pyarrow", batch_size=None, fn_kwargs=kwargs)


# --- WebDataset reading (runs in Ray workers) ------------------------------------------------------------------------

_WDS_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # the WebDataset convention: key . suffix
_WDS_READ_ROWS = 512


def _wds_samples(stream: object, url: str, max_member_bytes: int) -> Iterator[dict]:
    """Samples of one tar stream as dicts (``__key__``, ``__url__``, ``__error__``, one entry per member).

    Unlike Ray's reader, no member can stop the read: a member past ``max_member_bytes`` is skipped unread (tar
    headers give the size first; a sparse member's is its full size) and its sample gets the reason; a key seen
    again after other samples (members not contiguous, against the WebDataset convention) becomes its own sample
    ``KEY~N`` with the reason, so every key stays unique; a tar that breaks mid-way ends with a ``~unreadable``
    sample saying so. Nothing is lost silently."""
    current: dict | None = None
    seen: dict[str, int] = {}
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                match = _WDS_NAME.match(member.name) if member.isreg() else None
                if match is None:
                    continue
                prefix, suffix = match.group(1), match.group(2)
                if current is None or current["__base__"] != prefix:
                    if current is not None:
                        yield _finish(current)
                    again = seen.get(prefix, 0)
                    seen[prefix] = again + 1
                    current = {"__key__": prefix if not again else f"{prefix}~{again + 1}", "__base__": prefix,
                               "__url__": url, "__error__": None}
                    if again:
                        current["__error__"] = (f"members of sample {prefix!r} are not contiguous in the shard "
                                                "(re-create it with tar --sort=name)")
                if member.size > max_member_bytes:
                    current["__error__"] = current["__error__"] or (
                        f"image too large (member {suffix}: {member.size} bytes > {max_member_bytes})")
                    continue  # not read: the streaming tar skips its data
                if suffix in current:
                    current["__error__"] = current["__error__"] or f"duplicate member {suffix} in the sample"
                    continue
                current[suffix] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        if current is not None:
            yield _finish(current)
            current = None
        yield {"__key__": "~unreadable", "__url__": url,
               "__error__": f"shard unreadable after {sum(seen.values())} samples ({type(e).__name__})"}
    if current is not None:
        yield _finish(current)


def _finish(sample: dict) -> dict:
    sample.pop("__base__", None)
    return sample


def _rows_table(rows: list[dict]) -> pa.Table:
    # every member any sample has, null where a sample lacks it (pandas would say NaN, from_pylist drop it)
    names = list(dict.fromkeys(k for r in rows for k in r))
    return pa.table({k: [r.get(k) for r in rows] for k in names})


def _webdataset_datasource() -> type:
    """Ray's WebDataset datasource (listing, file metadata, task splitting) with :func:`_wds_samples` as the tar
    reader; built lazily so importing this module does not import Ray's internals."""
    from ray.data._internal.datasource.webdataset_datasource import WebDatasetDatasource

    class TolerantWebDatasetDatasource(WebDatasetDatasource):
        def __init__(self, paths: list[str], *, max_member_bytes: int, **kwargs: object) -> None:
            super().__init__(paths, **kwargs)
            self.max_member_bytes = max_member_bytes

        def _read_stream(self, stream: object, path: str) -> Iterator[pa.Table]:
            rows: list[dict] = []
            for sample in _wds_samples(stream, path, self.max_member_bytes):
                rows.append(sample)
                if len(rows) >= _WDS_READ_ROWS:
                    yield _rows_table(rows)
                    rows = []
            if rows:
                yield _rows_table(rows)

    return TolerantWebDatasetDatasource


# --- per-block normalisation (runs in Ray workers; plain functions so they pickle) ---------------------------------

def _relative(path: str, root: str) -> str:
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else posixpath.basename(path)


def _relative_array(paths: pa.Array | pa.ChunkedArray, root: str) -> list[str]:
    # Blocks usually hold one or a few shards: compute each distinct name once.
    values = paths.to_pylist()
    names = {p: _relative(p, root) for p in set(values)}
    return [names[p] for p in values]


def _labels(column: pa.ChunkedArray | pa.Array | None, n: int) -> pa.Array:
    if column is None:
        return pa.array(np.full(n, -1, dtype=np.int64))
    return pc.fill_null(pc.cast(column, pa.int64()), -1)


def _as_binary(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column if column.type == pa.binary() else pc.cast(column, pa.binary())


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


def _cap_images(images: pa.Array, errors: list[str | None], cap: int) -> pa.Array:
    """Cells past ``cap`` bytes -> null image and an ``image too large`` reason; the bytes go no further."""
    lengths = pc.binary_length(images).to_numpy(zero_copy_only=False)
    big = np.nan_to_num(lengths.astype(np.float64), nan=0.0) > cap
    if not big.any():
        return images
    for i in np.flatnonzero(big).tolist():
        errors[i] = errors[i] or f"image too large ({int(lengths[i])} bytes > {cap})"
    return pc.if_else(pa.array(big), pa.nulls(len(images), images.type), images)


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


def _parse_label(value: object) -> int:
    if value is None:
        return -1
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    try:
        return int(str(value).strip())
    except ValueError:
        return -1


def _normalise_webdataset(table: pa.Table, root: str, label_column: str | None) -> pa.Table:
    n = table.num_rows
    members = [c for c in table.column_names if not c.startswith("__")]
    # "0001.input.png" groups as suffix "input.png": the last extension decides what a member is.
    image_members = sorted(
        (c for c in members if c.lower().rsplit(".", 1)[-1] in IMAGE_EXTENSIONS),
        key=lambda c: IMAGE_EXTENSIONS.index(c.lower().rsplit(".", 1)[-1]),
    )
    image_values: list[bytes | None] = [None] * n
    for member in image_members:  # the first image member present in a sample wins
        for i, value in enumerate(table[member].to_pylist()):
            if image_values[i] is None and value is not None:
                image_values[i] = value
    label_names = list(dict.fromkeys(([label_column] if label_column else []) + list(_WDS_LABEL_MEMBERS)))

    def label_rank(member: str) -> int:
        # "cls" and "cls.txt" both name the label; the configured name outranks the conventional ones.
        name = member.lower()
        name = name if name in label_names else name.rsplit(".", 1)[0]
        return label_names.index(name) if name in label_names else -1

    label_members = sorted((c for c in members if label_rank(c) >= 0), key=label_rank)
    labels = [-1] * n
    for member in label_members:  # the configured label member first, then cls / label / class
        for i, value in enumerate(table[member].to_pylist()):
            if labels[i] == -1:
                labels[i] = _parse_label(value)
    shard_names = _relative_array(table["__url__"], root)
    wds_keys = table["__key__"].to_pylist()
    read_errors = table["__error__"].to_pylist() if "__error__" in table.column_names else [None] * n
    errors = [e if isinstance(e, str) and e else None for e in read_errors]  # pandas may hand NaN for None
    return pa.table({
        "key": pa.array([f"{s}/{k}" for s, k in zip(shard_names, wds_keys, strict=True)], type=pa.string()),
        "shard": pc.cast(table["__url__"], pa.string()),
        "image_bytes": pa.array(image_values, type=pa.binary()),
        "label": pa.array(labels, type=pa.int64()),
        "error": pa.array(errors, type=pa.string()),
        WDS_ID_COLUMN: _wds_sample_ids(table),
        "__key__": pc.cast(table["__key__"], pa.string()),
    })


def _normalise_imagefolder(table: pa.Table, root: str, classes: list[str],
                           max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> pa.Table:
    class_index = {c: i for i, c in enumerate(classes)}
    relative = _relative_array(table["path"], root)
    labels = [class_index.get(r.split("/", 1)[0], -1) if "/" in r else -1 for r in relative]
    errors: list[str | None] = [None] * table.num_rows
    images = _cap_images(_as_binary(table["bytes"]), errors, max_image_bytes)
    return pa.table({
        "key": pa.array(relative, type=pa.string()),
        "shard": table["path"],
        "image_bytes": images,
        "label": pa.array(labels, type=pa.int64()),
        "error": pa.array(errors, type=pa.string()),
        "path": table["path"],
    })


__all__ = [
    "FORMATS", "IMAGE_EXTENSIONS", "NORMALISED_COLUMNS", "WDS_ID_COLUMN", "SourceCheckpointFilter", "SourceError",
    "SourceInfo", "SourceSpec", "checkpoint_config", "duplicate_keys", "id_column", "inspect_source", "list_shards",
    "mark_duplicate_keys", "read_source",
]
