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

Nothing but file listings and a schema/header probe (every Parquet footer, the first WebDataset shard's first
members) happens on the driver, once per :class:`SourceSpec` object (a job makes one); rows stream through Ray.
One module per format (``parquet``, ``webdataset``, ``imagefolder``, each with the
:class:`~pipeline.sources.base.SourceFormat` functions), ``resume`` for resume and repeated keys.
"""


from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from pipeline.sources import imagefolder, parquet, webdataset
from pipeline.sources.base import (
    DEFAULT_MAX_IMAGE_BYTES,
    FORMATS,
    IMAGE_EXTENSIONS,
    NORMALISED_COLUMNS,
    WDS_ID_COLUMN,
    SourceError,
    SourceFormat,
    SourceInfo,
    SourceSpec,
    _filesystem,
    in_sample,
    list_shards,
    sample_rows,
)
from pipeline.sources.resume import (
    MAX_DUPLICATE_KEYS,
    SourceCheckpointFilter,
    checkpoint_config,
    duplicate_keys,
    id_column,
    mark_duplicate_keys,
)

if TYPE_CHECKING:
    import ray.data

_FORMAT_MODULES: dict[str, ModuleType] = {"parquet": parquet, "webdataset": webdataset, "imagefolder": imagefolder}


def source_format(spec: SourceSpec) -> SourceFormat:
    return _FORMAT_MODULES[spec.format]  # type: ignore[return-value] - a module with the protocol's functions


def inspect_source(spec: SourceSpec, fs: pafs.FileSystem | None = None) -> SourceInfo:
    """Validate a source before any Ray work: access, shards, and (Parquet) every shard's schema or
    (WebDataset) the first shard's first members. Raises StorageError / SourceError with the file named.

    Done once per spec object: later calls with the same spec (the job's read, resume and duplicate checks)
    reuse what the first learned instead of listing the shards again."""
    if spec._inspected:
        return spec._inspected[0]
    fs, root = _filesystem(spec, fs)
    info = source_format(spec).inspect(spec, fs, root)
    spec._inspected.append(info)
    return info


def read_source(spec: SourceSpec, fs: pafs.FileSystem | None = None) -> ray.data.Dataset:
    """A streaming Ray Dataset of normalised rows (see the module docstring); validates the source first."""
    fs, _ = _filesystem(spec, fs)
    info = inspect_source(spec, fs)
    ds, fn, kwargs = source_format(spec).reader(spec, fs, info)
    # batch_size=None maps whole blocks, so the maps fuse into the read tasks at no extra copy.
    ds = ds.map_batches(fn, batch_format="pyarrow", batch_size=None, fn_kwargs=kwargs)
    if spec.sampled:
        ds = ds.map_batches(sample_rows, batch_format="pyarrow", batch_size=None,
                            fn_kwargs={"fraction": spec.sample_fraction, "seed": spec.sample_seed})
    return ds if spec.limit is None else ds.limit(spec.limit)


def row_count(spec: SourceSpec, fs: pafs.FileSystem | None = None, *, list_images: bool = False) -> int | None:
    """How many rows the source holds (before any sample or limit), where that is known up front: Parquet, from the
    footers inspect read; with `list_images`, an image folder's files, listed once more for this (Ray lists them
    again for the read). None where it is not known: WebDataset would need every tar read."""
    fs, _ = _filesystem(spec, fs)
    if spec.format == "imagefolder":
        return len(list_shards(spec, fs)) if list_images else None
    rows = inspect_source(spec, fs).shard_rows
    return None if rows is None else sum(rows)


__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES", "FORMATS", "IMAGE_EXTENSIONS",
    "MAX_DUPLICATE_KEYS", "NORMALISED_COLUMNS", "WDS_ID_COLUMN", "SourceCheckpointFilter", "SourceError",
    "SourceFormat", "SourceInfo", "SourceSpec", "checkpoint_config", "duplicate_keys", "id_column", "in_sample",
    "inspect_source", "list_shards", "mark_duplicate_keys", "read_source", "row_count", "sample_rows",
    "source_format",
]
