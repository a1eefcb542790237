"""WebDataset tar shards: samples of members ``KEY.SUFFIX`` grouped by key, read by a tolerant variant of Ray's
WebDataset datasource (see :func:`_wds_samples`). Keys are ``{shard}/{__key__}``; the resume id is ``sample_id``.
"""

from __future__ import annotations

import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline.sources.base import (
    IMAGE_EXTENSIONS,
    WDS_ID_COLUMN,
    SourceError,
    SourceInfo,
    SourceSpec,
    Unopened,
    _has_extension,
    _relative_array,
    label_value,
    list_shards,
    open_or_unopened,
)
from pipeline.storage import describe

if TYPE_CHECKING:
    import ray.data

# WebDataset members read as the label besides the configured label column name.
_WDS_LABEL_MEMBERS = ("cls", "label", "class")


# How many tar members of the first WebDataset shard to look at for an image before giving up.
_WDS_PROBE_MEMBERS = 64


def inspect(spec: SourceSpec, fs: pafs.FileSystem, root: str) -> SourceInfo:
    """Access, shards, and the first members of the first shard: a clear error now beats a failed Ray task later.
    Other shards are not read here (that would read the whole source twice): what is wrong inside one becomes
    error rows (see _wds_samples)."""
    info = SourceInfo(root=root, shards=list_shards(spec, fs))
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
    return info


def reader(spec: SourceSpec, fs: pafs.FileSystem, info: SourceInfo
           ) -> tuple[ray.data.Dataset, Callable[..., pa.Table], dict[str, Any]]:
    import ray.data

    ds = ray.data.read_datasource(
        _webdataset_datasource()(info.shards, max_member_bytes=spec.max_image_bytes, decoder=None, filesystem=fs),
        override_num_blocks=len(info.shards))
    return ds, _normalise_webdataset, {"root": info.root, "label_column": spec.label_column}


# --- reading (runs in Ray workers) -----------------------------------------------------------------------------------

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
                match = _WDS_NAME.match(_utf8(member.name)) if member.isreg() else None
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
    except (tarfile.TarError, EOFError, zlib.error) as e:
        # the bytes are wrong (truncated, corrupt); an I/O error (OSError) propagates for Ray to retry the read
        reason = f"shard unreadable after {sum(seen.values())} samples ({type(e).__name__})"
        if current is not None:  # the sample being read when the bytes ran out is incomplete
            current["__error__"] = current["__error__"] or reason
            yield _finish(current)
            current = None
        # and whatever followed it is lost: one row says so
        yield {"__key__": "~unreadable", "__url__": url, "__error__": reason}
    if current is not None:
        yield _finish(current)


def _utf8(name: str) -> str:
    """A member name as text Arrow can hold: tarfile keeps bytes that are not UTF-8 as lone surrogates, which no
    Arrow string (nor column name) takes; they become ``\\xNN`` escapes, so the sample is read under that name."""
    if name.isascii():
        return name
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that did not come from a byte (a PAX header may spell one)
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


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

        def _open_input_source(self, filesystem: pafs.FileSystem, path: str, **open_args: Any) -> Any:
            return open_or_unopened(lambda: super(TolerantWebDatasetDatasource, self)._open_input_source(
                filesystem, path, **open_args), "shard")

        def _read_stream(self, stream: object, path: str) -> Iterator[pa.Table]:
            if isinstance(stream, Unopened):  # one row says so, as for a tar that breaks mid-way
                yield _rows_table([{"__key__": "~unreadable", "__url__": path, "__error__": stream.reason}])
                return
            rows: list[dict] = []
            for sample in _wds_samples(stream, path, self.max_member_bytes):
                rows.append(sample)
                if len(rows) >= _WDS_READ_ROWS:
                    yield _rows_table(rows)
                    rows = []
            if rows:
                yield _rows_table(rows)

    return TolerantWebDatasetDatasource


# --- per-block normalisation (runs in Ray workers) ------------------------------------------------------------------

def _wds_sample_ids(table: pa.Table) -> pa.Array:
    return pc.binary_join_element_wise(
        pc.cast(table["__url__"], pa.string()), pc.cast(table["__key__"], pa.string()), "/"
    )


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
                labels[i] = label_value(value)
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
