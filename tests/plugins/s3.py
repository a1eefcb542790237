"""A real S3 endpoint for the tests (moto in server mode on 127.0.0.1) and Fashion-MNIST shard writers.

pyarrow's S3 client talks HTTP, so moto's in-process ``mock_aws`` cannot intercept it: the server runs in a thread
of the test process and Ray's workers reach it over loopback. Dummy AWS credentials are put in the environment when
this plugin loads, before any test starts Ray, so that Ray's worker processes inherit them too (the filesystem
objects Ray ships to workers carry no credentials of their own).
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    # No instance-metadata lookups (slow timeouts off EC2).
    "AWS_EC2_METADATA_DISABLED": "true",
}
# Anything that could send a test to a real account or another endpoint is removed for the session.
CLEARED_ENV = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "S3_ENDPOINT_URL",
               "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")

_saved_env: dict[str, str | None] = {}


def pytest_configure(config: pytest.Config) -> None:
    for name in (*DUMMY_AWS_ENV, *CLEARED_ENV):
        _saved_env[name] = os.environ.get(name)
    for name in CLEARED_ENV:
        os.environ.pop(name, None)
    os.environ.update(DUMMY_AWS_ENV)


def pytest_unconfigure(config: pytest.Config) -> None:
    for name, value in _saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@dataclass
class S3Server:
    """A running moto S3 server. ``endpoint_url`` is ``http://127.0.0.1:PORT``."""

    host: str
    port: int

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def filesystem(self, allow_bucket_creation: bool = False) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(
            endpoint_override=f"{self.host}:{self.port}", scheme="http", region="us-east-1",
            allow_bucket_creation=allow_bucket_creation,
        )

    def client(self):  # -> botocore S3 client
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name by default) and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO; the test output is not the place for that.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(host=host, port=port)
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A new, empty bucket for one test."""
    return s3_server.make_bucket()


# --- Fashion-MNIST shards -------------------------------------------------------------------------------------------

FORMAT_EXTENSIONS = {"parquet": "parquet", "webdataset": "tar"}


@dataclass
class ShardSet:
    """What make_fmnist_shards wrote: ``expected`` maps each key the reader must produce to its label."""

    fmt: str
    root: str
    uri: str
    paths: list[str]
    expected: dict[str, int] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)  # key -> uint8 (28, 28)


def _write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def make_fmnist_shards(
    fs: pafs.FileSystem,
    root: str,
    n_shards: int,
    per_shard: int,
    fmt: str,
    *,
    start: int = 0,
    with_keys: bool = True,
    with_labels: bool = True,
    global_keys: bool = True,
) -> ShardSet:
    """Write ``n_shards`` x ``per_shard`` Fashion-MNIST test images (PNG bytes) under ``root`` of ``fs``.

    ``fmt``: ``parquet`` (columns ``key``, ``image``, ``label``; ``with_keys``/``with_labels`` drop the optional
    ones), ``webdataset`` (``NNNNNN.png`` + ``NNNNNN.cls``; ``NNNNNN`` is the global index, or with
    ``global_keys=False`` the index within the shard, as many WebDataset writers do) or ``imagefolder``
    (``cN/NNNNNN.png``, class dirs ``c0``..``c9``, ``n_shards`` x ``per_shard`` files).
    ``root`` is a filesystem path (``bucket/prefix`` on S3); LocalFileSystem works too.
    """
    from pipeline.datasets import load_fashion_mnist
    from pipeline.decode import encode_png

    images, labels = load_fashion_mnist("test")
    total = n_shards * per_shard
    if start + total > len(images):
        raise ValueError(f"only {len(images)} test images, asked for {start}..{start + total}")
    root = root.rstrip("/")
    if fs.type_name == "local":
        fs.create_dir(root, recursive=True)
    uri = f"s3://{root}" if fs.type_name == "s3" else root
    shard_set = ShardSet(fmt=fmt, root=root, uri=uri, paths=[])
    for s in range(n_shards):
        idx = np.arange(start + s * per_shard, start + (s + 1) * per_shard)
        pngs = encode_png(images[idx][:, None])
        if fmt == "imagefolder":
            for i, png in zip(idx.tolist(), pngs, strict=True):
                rel = f"c{labels[i]}/{i:06d}.png"
                path = f"{root}/{rel}"
                if fs.type_name == "local":
                    fs.create_dir(f"{root}/c{labels[i]}", recursive=True)
                _write_bytes(fs, path, png)
                shard_set.paths.append(path)
                shard_set.expected[rel] = int(labels[i])
                shard_set.images[rel] = images[i]
            continue
        name = f"shard-{s:05d}.{FORMAT_EXTENSIONS[fmt]}"
        path = f"{root}/{name}"
        if fmt == "parquet":
            keys = [f"fmnist-{i:06d}" for i in idx.tolist()]
            columns: dict[str, pa.Array] = {"image": pa.array(pngs, type=pa.binary())}
            if with_keys:
                columns["key"] = pa.array(keys, type=pa.string())
            if with_labels:
                columns["label"] = pa.array(labels[idx], type=pa.int64())
            # Small row groups: a shard is then several read units, as real shards are.
            pq.write_table(pa.table(columns), path, filesystem=fs, row_group_size=max(1, per_shard // 3))
            if not with_keys:
                keys = [f"{name}:{row}" for row in range(per_shard)]
        elif fmt == "webdataset":
            buf = io.BytesIO()
            wds_keys = [f"{i if global_keys else j:06d}" for j, i in enumerate(idx.tolist())]
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for i, wds_key, png in zip(idx.tolist(), wds_keys, pngs, strict=True):
                    members = [("png", png)] + ([("cls", str(labels[i]).encode())] if with_labels else [])
                    for ext, data in members:
                        info = tarfile.TarInfo(f"{wds_key}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            _write_bytes(fs, path, buf.getvalue())
            keys = [f"{name}/{k}" for k in wds_keys]
        else:
            raise ValueError(f"unknown shard format {fmt!r}")
        shard_set.paths.append(path)
        for key, i in zip(keys, idx.tolist(), strict=True):
            shard_set.expected[key] = int(labels[i]) if with_labels else -1
            shard_set.images[key] = images[i]
    return shard_set


@pytest.fixture
def make_shards() -> Callable[..., ShardSet]:
    """The make_fmnist_shards function, for tests that prefer a fixture."""
    return make_fmnist_shards
