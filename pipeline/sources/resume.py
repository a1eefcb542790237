"""Resume: the reader-native id column Ray's checkpoint keys on, the filter that reads it from every format's blocks,
and repeated keys (which resume could not tell apart), found before the job and marked as error rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from ray.data.block import BlockAccessor
from ray.data.checkpoint import CheckpointConfig
from ray.data.checkpoint.checkpoint_filter import NumpyArrayBasedCheckpointFilter

from pipeline.requeue import DUPLICATE_KEY
from pipeline.sources.base import WDS_ID_COLUMN, SourceError, SourceSpec, _filesystem
from pipeline.sources.parquet import _fill_missing_keys
from pipeline.sources.webdataset import _wds_sample_ids
from pipeline.storage import describe, resolve_filesystem, uri_path


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
    from pipeline.sources import inspect_source

    return inspect_source(spec, fs).id_column


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
    from pipeline.sources import inspect_source

    fs, _ = _filesystem(spec, fs)
    info = inspect_source(spec, fs)
    if spec.format != "parquet" or not info.has_key:
        return {}
    if info.duplicates is not None:  # resume and the plan both ask; the key column is read once
        return info.duplicates
    import pyarrow.dataset as pads

    # the read's own key type: without it the first shard's type decides, and another shard's may not cast to it
    schema = pa.schema([info.read_schema.field(spec.key_column)]) if info.read_schema is not None else None
    try:
        column = pads.dataset(info.shards, filesystem=fs, format="parquet", schema=schema).to_table(
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
    info.duplicates = dups
    return dups


def mark_duplicate_keys(table: pa.Table, counts: dict[str, int]) -> pa.Table:
    """Per block, after the read: every row whose key repeats in the source gets the error
    ``duplicate key (N rows of the source have this key)``; decode keeps an error it finds, so each such row
    becomes an error row. All of them are kept (rows out == rows in), none is preferred: which one is "first"
    depends on read order, and a key that names two images cannot tie a result to one of them. Resume, keyed on
    the same ids, treats them alike too."""
    errors = [None if k is None or k not in counts
              else f"{DUPLICATE_KEY} ({counts[k]} rows of the source have this key)" for k in table["key"].to_pylist()]
    if "error" in table.column_names:
        # The key's verdict wins over a reason the read found: every row of a repeated key must say so, or resume
        # (which compares the two) would take the key back on every run.
        errors = [new or old for old, new in zip(table["error"].to_pylist(), errors, strict=True)]
        table = table.drop_columns(["error"])
    return table.append_column("error", pa.array(errors, type=pa.string()))
