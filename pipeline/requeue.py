"""Resume that never freezes a transient failure.

Ray Data's checkpoint records the id of every row the job writes, error rows included, and a rerun skips them. A
row that failed because the black box was down, slow, out of budget or refused the credentials is not done,
though: before a rerun starts, `release_retryable` removes such rows (``retryable`` true in the output) from the
output files and their ids from the checkpoint, so the rerun processes them again. Rows that failed on their own
data (``retryable`` false) stay as they are.

A repeated key is a verdict on the source as it is now, not on the row: when a shard added since the last run
repeats a key that run finished, the finished row is released too, so that every row carrying the key becomes a
"duplicate key" error row (instead of the new row being skipped as done); and a "duplicate key" error row whose key
no longer repeats is released, so that its row gets a result.

Order matters for a crash in the middle: ids leave the checkpoint first, rows leave the output second. Stopped
between the two, the next start finds the same rows and finishes the job; at no point is a row in neither place.
Each file is rewritten under a hidden temporary name and moved over the original, so a reader never sees half a
file.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.storage import StorageError, describe

log = logging.getLogger(__name__)
PENDING_SUFFIX = ".pending.parquet"  # Ray's two-phase commit: not yet committed, Ray cleans these itself
DUPLICATE_KEY = "duplicate key"  # how the error of a row whose key repeats in the source begins


@dataclass
class Released:
    rows: int  # rows removed from the output, to be processed again
    files: int  # output files rewritten


def _visible(relative: str) -> bool:
    return not any(part.startswith(("_", ".")) for part in relative.split("/"))


def parquet_files(fs: pafs.FileSystem, root: str) -> list[str]:
    """The job's files under `root`: visible ``*.parquet`` files. Anything else a user leaves there (a note, a
    listing) is not read, so it cannot fail a resume or the summary."""
    root = root.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                  and _visible(i.path[len(root) + 1:]))


def _schema_names(fs: pafs.FileSystem, path: str) -> list[str]:
    try:
        return pq.read_schema(path, filesystem=fs).names
    except (pa.ArrowInvalid, OSError) as e:
        # before any work and naming the file: pyarrow's own message does neither
        raise StorageError(f"output file {describe(fs, path)} is not a readable Parquet file ({e}): an output "
                           "folder holds only its job's files; move this one away or choose another output.uri"
                           ) from None


def _rewrite(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    parent, _, name = path.rpartition("/")
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
    with fs.open_output_stream(tmp) as f:
        pq.write_table(table, f)
    fs.move(tmp, path)


def _release_mask(t: pa.Table, id_column: str, duplicated: pa.Array | None) -> pa.Array:
    """Rows of an output table to process again: retryable error rows, and rows whose "duplicate key" verdict no
    longer matches the source (``duplicated``: its repeated keys as strings; None: not checked)."""
    mask = pc.fill_null(t["retryable"], False) if "retryable" in t.column_names else pa.array(
        np.zeros(t.num_rows, bool))
    if duplicated is not None and "error" in t.column_names:
        repeats = pc.fill_null(pc.is_in(pc.cast(t[id_column], pa.string()), value_set=duplicated), False)
        marked = pc.fill_null(pc.starts_with(t["error"], DUPLICATE_KEY), False)
        mask = pc.or_(mask, pc.xor(repeats, marked))
    return mask


def uncommitted(fs: pafs.FileSystem, out_path: str, checkpoint_path: str) -> set[str]:
    """Output files of a write whose checkpoint is still pending (a run cut short inside Ray's two-phase commit):
    Ray's checkpoint filter deletes them before the rerun reads its ids, so their rows do not count as written."""
    if not _exists(fs, checkpoint_path):
        return set()
    pending = [p.rsplit("/", 1)[-1][:-len(PENDING_SUFFIX)] for p in parquet_files(fs, checkpoint_path)
               if p.endswith(PENDING_SUFFIX)]
    if not pending:
        return set()
    return {p for p in parquet_files(fs, out_path) if p.rsplit("/", 1)[-1].startswith(tuple(pending))}


def released_ids(fs: pafs.FileSystem, out_path: str, id_column: str,
                 duplicated_keys: Mapping[str, int] | None = None, skip: set[str] | frozenset = frozenset()
                 ) -> pa.Array:
    """The ids to process again: those of retryable error rows and of rows whose "duplicate key" verdict no longer
    matches the source (see _release_mask), and every repeated key (``duplicated_keys``: key -> rows of the source
    that carry it) whose rows the output does not hold exactly: Ray's checkpoint skips an id once any row with it
    is written, so a run cut short (or by a limit) between two rows of a key would otherwise never write the other.
    `skip`: output files not to read (see `uncommitted`).
    """
    duplicated = None if duplicated_keys is None else pa.array(sorted(duplicated_keys), pa.string())
    ids: list[pa.Array] = []
    written: Counter = Counter()  # rows of each repeated key in the output, by the id's own value
    for path in parquet_files(fs, out_path):
        if path in skip:
            continue
        names = _schema_names(fs, path)
        if id_column not in names:
            continue
        columns = [id_column] + [c for c in ("retryable", "error") if c in names]
        t = pq.read_table(path, filesystem=fs, columns=columns)
        mask = _release_mask(t, id_column, duplicated)
        if pc.any(mask).as_py():
            ids.append(t[id_column].filter(mask).combine_chunks())
        if duplicated is not None and len(duplicated):
            hit = pc.fill_null(pc.is_in(pc.cast(t[id_column], pa.string()), value_set=duplicated), False)
            written.update(t[id_column].filter(hit).to_pylist())
    short = [k for k, n in written.items() if n != duplicated_keys[str(k)]]
    if short:
        ids.append(pa.array(short))
    if not ids:
        return pa.array([], pa.string())
    return pa.concat_arrays([a.cast(ids[0].type) for a in ids])


def release_retryable(fs: pafs.FileSystem, out_path: str, checkpoint_path: str, id_column: str,
                      duplicated_keys: Mapping[str, int] | None = None) -> Released:
    """Make the next run process again every row of the output that `released_ids` names (retryable failures,
    changed or incomplete repeated keys; ``duplicated_keys``: key -> rows that carry it in the source now, None:
    not checked). Every output row with a released id goes, so that no row is left behind for an id the checkpoint
    no longer holds, which the rerun would write a second time. See the module's docstring."""
    doomed = uncommitted(fs, out_path, checkpoint_path)
    ids = released_ids(fs, out_path, id_column, duplicated_keys, skip=doomed)
    if not len(ids):
        return Released(0, 0)
    for path in parquet_files(fs, checkpoint_path) if _exists(fs, checkpoint_path) else []:
        if path.endswith(PENDING_SUFFIX):
            continue
        t = pq.read_table(path, filesystem=fs)
        if id_column not in t.column_names:
            continue
        keep = pc.invert(pc.is_in(t[id_column], value_set=ids.cast(t.schema.field(id_column).type)))
        if int(pc.sum(keep).as_py() or 0) < t.num_rows:
            _rewrite(fs, path, t.filter(keep))
    removed = files = 0
    for path in parquet_files(fs, out_path):
        if path in doomed or id_column not in _schema_names(fs, path):
            continue
        column = pq.read_table(path, filesystem=fs, columns=[id_column])[id_column]
        if not pc.any(pc.is_in(column, value_set=ids.cast(column.type))).as_py():
            continue
        t = pq.read_table(path, filesystem=fs)
        kept = t.filter(pc.invert(pc.fill_null(pc.is_in(t[id_column], value_set=ids.cast(column.type)), False)))
        removed += t.num_rows - kept.num_rows
        files += 1
        _rewrite(fs, path, kept)
    log.info("processing again %d row(s) that failed for a reason that can pass (black box, budget, credentials, "
             "a key that repeated, now repeats, or was not written in full)", removed)
    return Released(removed, files)


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.Directory
