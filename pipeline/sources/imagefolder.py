"""An image folder: image files under a root, one class per top-level directory, read by Ray's binary-file reader.
Keys are paths relative to the root; the resume id is ``path``."""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.sources.base import (
    DEFAULT_MAX_IMAGE_BYTES,
    IMAGE_EXTENSIONS,
    SourceError,
    SourceInfo,
    SourceSpec,
    Unopened,
    _as_binary,
    _cap_images,
    _relative_array,
    _skipped,
    open_or_unopened,
    undecodable_name,
)
from pipeline.storage import StorageError, check_readable, describe

if TYPE_CHECKING:
    import ray.data


def inspect(spec: SourceSpec, fs: pafs.FileSystem, root: str) -> SourceInfo:
    """Access and the class directories. Only the top level is listed here: Ray lists the tree itself, and listing
    millions of objects twice is what an image-folder source on S3 cannot afford."""
    if check_readable(fs, root).type != pafs.FileType.Directory:
        raise SourceError(f"imagefolder source must be a directory: {describe(fs, root)}")
    return SourceInfo(root=root, classes=_list_classes(fs, root), id_column="path")


def reader(spec: SourceSpec, fs: pafs.FileSystem, info: SourceInfo
           ) -> tuple[ray.data.Dataset, Callable[..., pa.Table], dict[str, Any]]:
    import ray.data
    from ray.data.datasource.file_meta_provider import DefaultFileMetadataProvider

    try:  # Ray lists the tree here
        datasource = _capped_binary_datasource()(
            info.root, max_bytes=spec.max_image_bytes, filesystem=fs, include_paths=True,
            file_extensions=list(IMAGE_EXTENSIONS), meta_provider=DefaultFileMetadataProvider())
    except UnicodeDecodeError as e:
        raise undecodable_name(fs, info.root, e) from None
    ds = ray.data.read_datasource(datasource)
    return ds, _normalise_imagefolder, {"root": info.root, "classes": info.classes,
                                        "max_image_bytes": spec.max_image_bytes}


def _list_classes(fs: pafs.FileSystem, root: str) -> list[str]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    except OSError as e:
        raise StorageError(f"cannot list {describe(fs, root)}: {e}") from e
    try:
        return sorted(
            posixpath.basename(i.path.rstrip("/")) for i in infos
            if i.type == pafs.FileType.Directory and not _skipped(posixpath.basename(i.path.rstrip("/")))
        )
    except UnicodeDecodeError as e:
        raise undecodable_name(fs, root, e) from None


def _capped_binary_datasource() -> type:
    """Ray's binary-file datasource reading at most ``max_bytes + 1`` bytes of a file: a larger file becomes an
    error row without ever being held whole. Built lazily so importing this module does not import Ray's internals."""
    from ray.data._internal.datasource.binary_datasource import BinaryDatasource

    class CappedBinaryDatasource(BinaryDatasource):
        def __init__(self, paths: str | list[str], *, max_bytes: int, **kwargs: object) -> None:
            super().__init__(paths, **kwargs)
            self.max_bytes = max_bytes

        def _open_input_source(self, filesystem: pafs.FileSystem, path: str, **open_args: Any) -> Any:
            return open_or_unopened(lambda: super(CappedBinaryDatasource, self)._open_input_source(
                filesystem, path, **open_args), "file")

        def _read_stream(self, f: pa.NativeFile | Unopened, path: str) -> Iterator[pa.Table]:
            if isinstance(f, Unopened):
                data, error = None, f.reason
            else:
                data, error = f.read(self.max_bytes + 1), None
                if len(data) > self.max_bytes:
                    data, error = None, f"image too large (file past {self.max_bytes} bytes)"
            yield pa.table({"bytes": pa.array([data], pa.binary()), "__error__": pa.array([error], pa.string())})

    return CappedBinaryDatasource


# --- per-block normalisation (runs in Ray workers) ------------------------------------------------------------------

def _normalise_imagefolder(table: pa.Table, root: str, classes: list[str],
                           max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> pa.Table:
    class_index = {c: i for i, c in enumerate(classes)}
    relative = _relative_array(table["path"], root)
    labels = [class_index.get(r.split("/", 1)[0], -1) if "/" in r else -1 for r in relative]
    errors: list[str | None] = (table["__error__"].to_pylist() if "__error__" in table.column_names
                                else [None] * table.num_rows)
    images = _cap_images(_as_binary(table["bytes"]), errors, max_image_bytes)
    return pa.table({
        "key": pa.array(relative, type=pa.string()),
        "shard": table["path"],
        "image_bytes": images,
        "label": pa.array(labels, type=pa.int64()),
        "error": pa.array(errors, type=pa.string()),
        "path": table["path"],
    })
