"""What every source format shares: the spec, what inspection learns, shard listing, and per-block helpers.

A format is one module of this package with the :class:`SourceFormat` functions; ``pipeline.sources`` picks it by
``SourceSpec.format``.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.storage import StorageError, check_readable, describe, resolve_filesystem, uri_path

if TYPE_CHECKING:
    import ray.data

FORMATS = ("parquet", "webdataset", "imagefolder")


IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


_SHARD_EXTENSIONS = {"parquet": ("parquet",), "webdataset": ("tar",), "imagefolder": IMAGE_EXTENSIONS}


# Largest encoded image (Parquet cell, tar member, image file) passed on from the read: bigger ones become error
# rows there, and tar members are not even read. The same order as decode's own byte limit.
DEFAULT_MAX_IMAGE_BYTES = 32 * 1024 * 1024

NORMALISED_COLUMNS = ("key", "shard", "image_bytes", "label", "error")
WDS_ID_COLUMN = "sample_id"


class SourceError(StorageError):
    """The source exists but cannot be used as configured (no shards, wrong columns, an unreadable shard)."""


@dataclass(frozen=True)
class SourceSpec:
    """Where the images are and how to read them.

    ``uri``: a directory (scanned recursively for shards) or one shard, local or ``s3://bucket/prefix``.
    ``format``: ``parquet`` | ``webdataset`` | ``imagefolder``.
    ``image_column`` / ``key_column`` / ``label_column``: Parquet column names (``label_column`` also names the
    WebDataset label member besides ``cls``); key and label columns are optional in the data, ``None`` ignores them.
    ``endpoint_url``: S3-compatible endpoint (else env ``S3_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL``).
    ``sample_fraction`` / ``sample_seed``: keep only the rows whose key hashes below the fraction (see
    :func:`in_sample`): the same rows whatever the read order, the cluster or the shard a row sits in.
    ``limit``: read at most this many rows (after the sample; with a resumed job it counts new rows). Which rows a
    limit keeps depends on the order reads finish in: for the same rows every run, sample instead.
    """

    uri: str
    format: str = "parquet"
    image_column: str = "image"
    key_column: str | None = "key"
    label_column: str | None = "label"
    endpoint_url: str | None = None
    limit: int | None = None
    sample_fraction: float | None = None
    sample_seed: int = 0
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    # What inspect_source learned, kept on this spec object: one job makes one spec and inspects once, however many
    # of read_source / id_column / checkpoint_config / duplicate_keys it calls. A new spec inspects again.
    _inspected: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown source format {self.format!r}; expected one of {', '.join(FORMATS)}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")
        if self.sample_fraction is not None and not 0 < self.sample_fraction <= 1:
            raise ValueError(f"sample_fraction must be in (0, 1], got {self.sample_fraction}")
        if not 0 <= self.sample_seed < 2**64:
            raise ValueError(f"sample_seed must be in [0, 2**64), got {self.sample_seed}")
        if self.max_image_bytes < 1:
            raise ValueError(f"max_image_bytes must be >= 1, got {self.max_image_bytes}")

    @property
    def sampled(self) -> bool:
        """Whether a sample leaves rows out (a fraction of 1 keeps every row)."""
        return self.sample_fraction is not None and self.sample_fraction < 1


@dataclass
class SourceInfo:
    """What validation learned about a source; everything read_source needs besides the filesystem."""

    root: str
    shards: list[str] = field(default_factory=list)
    has_key: bool = False
    has_label: bool = False
    classes: list[str] = field(default_factory=list)
    id_column: str | None = None
    duplicates: dict[str, int] | None = None  # repeated keys, once duplicate_keys has read them
    read_schema: pa.Schema | None = None  # Parquet: the columns and types the read asks every shard for
    shard_rows: list[int] | None = None  # Parquet: each shard's row count, from the footers inspect read


class SourceFormat(Protocol):
    """One source format: what its module provides."""

    def inspect(self, spec: SourceSpec, fs: pafs.FileSystem, root: str) -> SourceInfo:
        """Validate access and layout before any Ray work (StorageError / SourceError naming the file)."""

    def reader(self, spec: SourceSpec, fs: pafs.FileSystem, info: SourceInfo
               ) -> tuple[ray.data.Dataset, Callable[..., pa.Table], dict[str, Any]]:
        """Ray's reader for the source, and the per-block normaliser (with its keyword arguments) that turns its
        blocks into the normalised columns; it runs fused into the read tasks."""


def _filesystem(spec: SourceSpec, fs: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    if fs is None:
        return resolve_filesystem(spec.uri, spec.endpoint_url)
    # The caller's filesystem wins; only the path is taken from the URI (no second client is built).
    return fs, uri_path(spec.uri)


def _skipped(relative: str) -> bool:
    # Same convention as Ray's directory expansion, applied to every path component so that checkpoint or
    # temporary folders (_checkpoint/, .cache/) inside a source tree are never read as shards.
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


def undecodable_name(fs: pafs.FileSystem, root: str, e: UnicodeDecodeError) -> SourceError:
    """The error for a listing that met a name which is not UTF-8: Arrow cannot name such a file at all (not even
    to list it), so it could be neither read nor reported as an error row."""
    name = bytes(e.object).decode("utf-8", "backslashreplace")
    return SourceError(f"a name under {describe(fs, root)} is not UTF-8 text: {name}; rename it (or move it out of "
                       "the source)")


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
    try:
        shards = sorted(
            i.path for i in infos
            if i.type == pafs.FileType.File
            and _has_extension(i.path, extensions)
            and not _skipped(i.path[len(prefix):] if i.path.startswith(prefix) else posixpath.basename(i.path))
        )
    except UnicodeDecodeError as e:
        raise undecodable_name(fs, root, e) from None
    if not shards:
        raise SourceError(
            f"no {spec.format} shards (*.{' / *.'.join(extensions)}) under {describe(fs, root)}"
        )
    return shards


# --- reading (runs in Ray workers) -----------------------------------------------------------------------------------

# Why a listed file may not open that says nothing about the storage as a whole: it is gone since the listing, a
# directory, or not ours to read. Anything else (a network or service error) propagates for Ray to retry the read,
# rather than becoming an error row that a rerun would not take back.
_FILE_OPEN_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class Unopened:
    """Stands in for a file that could not be opened, where Ray's reader expects an open one: the format's
    ``_read_stream`` turns it into one error row, so one such file does not fail its read task and the job."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __enter__(self) -> Unopened:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def open_or_unopened(open_file: Callable[[], Any], what: str) -> Any:
    """``open_file()``, or an :class:`Unopened` saying why when the file itself cannot be opened."""
    try:
        return open_file()
    except _FILE_OPEN_ERRORS as e:
        return Unopened(f"{what} cannot be opened ({type(e).__name__})")


# --- per-block helpers (run in Ray workers; plain functions so they pickle) ----------------------------------------

def _relative(path: str, root: str) -> str:
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else posixpath.basename(path)


def _relative_array(paths: pa.Array | pa.ChunkedArray, root: str) -> list[str]:
    # Blocks usually hold one or a few shards: compute each distinct name once.
    values = paths.to_pylist()
    names = {p: _relative(p, root) for p in set(values)}
    return [names[p] for p in values]


def label_value(value: object) -> int:
    """A class id from a label cell (an integer, an integral float, text or bytes holding one), -1 for none or for
    what is not one (negative, past int64, NaN, free text): a label is metadata, never a reason to fail a read."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        value = value.strip()
        if not value.isascii() or not value.isdigit():  # int() would also take "1_0", "-1" or other scripts' digits
            return -1
    elif isinstance(value, float) and not (np.isfinite(value) and value.is_integer()):
        return -1
    elif not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
        return -1
    number = int(value)
    return number if 0 <= number < 2**63 else -1


def _labels(column: pa.ChunkedArray | pa.Array | None, n: int) -> pa.Array:
    if column is None:
        return pa.array(np.full(n, -1, dtype=np.int64))
    if pa.types.is_signed_integer(column.type):  # the usual case, in Arrow
        labels = pc.fill_null(pc.cast(column, pa.int64()), -1)
        return pc.if_else(pc.less(labels, 0), -1, labels)
    # Unsigned, float (an integer column with gaps, as pandas writes it) or, where shards differ in that, text (see
    # parquet._read_schema) labels.
    return pa.array([label_value(v) for v in column.to_pylist()], type=pa.int64())


def _as_binary(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column if column.type == pa.binary() else pc.cast(column, pa.binary())


def _cap_images(images: pa.Array, errors: list[str | None], cap: int) -> pa.Array:
    """Cells past ``cap`` bytes -> null image and an ``image too large`` reason; the bytes go no further."""
    lengths = pc.binary_length(images).to_numpy(zero_copy_only=False)
    big = np.nan_to_num(lengths.astype(np.float64), nan=0.0) > cap
    if not big.any():
        return images
    for i in np.flatnonzero(big).tolist():
        errors[i] = errors[i] or f"image too large ({int(lengths[i])} bytes > {cap})"
    return pc.if_else(pa.array(big), pa.nulls(len(images), images.type), images)


def in_sample(key: str, fraction: float, seed: int = 0) -> bool:
    """Whether a row with this key belongs to the ``fraction`` sample drawn with ``seed``.

    A hash of the key, read as a number in [0, 1), below the fraction: a Bernoulli sample that depends on the key
    alone, so every worker, read order and rerun agrees; a larger fraction keeps every row of a smaller one, and
    rows added to the source later join it at the same rate."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, salt=seed.to_bytes(16, "little")).digest()
    return int.from_bytes(digest, "little") < fraction * 2.0**64


def sample_rows(table: pa.Table, fraction: float, seed: int) -> pa.Table:
    """The rows of a normalised block that are :func:`in_sample` (by their ``key``)."""
    keep = [in_sample("" if k is None else k, fraction, seed) for k in table["key"].to_pylist()]
    return table.filter(pa.array(keep, type=pa.bool_()))
