"""Fashion-MNIST, the embedded domain, read from the Debian package's idx files (no network)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

FMNIST_DIR = Path(os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str = "test", root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (N, 28, 28), labels int64 (N,)) for split 'train' or 'test'."""
    root = Path(root) if root else FMNIST_DIR
    prefix = {"train": "train", "test": "t10k"}[split]
    img_path = root / f"{prefix}-images-idx3-ubyte.gz"
    if not img_path.exists():
        raise FileNotFoundError(
            f"{img_path} not found: install the Debian package 'dataset-fashion-mnist' "
            "(apt-get install -y dataset-fashion-mnist) or set FMNIST_DIR"
        )
    images = _read_idx(img_path)
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


# CIFAR-10 for GPU users with a hub: the parquet export of `uoft-cs/cifar10` (columns `img` = {bytes: PNG}, `label`).
CIFAR10_REPO = "uoft-cs/cifar10"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DATASETS = ("fmnist", "cifar10")


def _cifar10_files(split: str, root: Path | str | None) -> list[Path]:
    root = root or os.environ.get("CIFAR10_DIR")
    if not root:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FileNotFoundError("CIFAR-10 not found: set CIFAR10_DIR to a folder holding the parquet files of "
                                    f"{CIFAR10_REPO}, or unset HF_HUB_OFFLINE to download them")
        from huggingface_hub import snapshot_download

        root = snapshot_download(CIFAR10_REPO, repo_type="dataset", allow_patterns=["plain_text/*"])
    root = Path(root)
    # The hub has used both `plain_text/test-00000-of-00001.parquet` and `plain_text/test/0000.parquet`.
    files = sorted({*root.rglob(f"{split}-*.parquet"), *root.rglob(f"{split}/*.parquet")})
    if not files:
        raise FileNotFoundError(f"no {split} parquet files of CIFAR-10 under {root}")
    return files


def load_cifar10(split: str = "test", root: Path | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (N, 3, 32, 32), labels int64 (N,)) from the hub's parquet export (or CIFAR10_DIR)."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = [], []
    for f in _cifar10_files(split, root):
        table = pq.read_table(f, columns=["img", "label"])
        for cell in table.column("img").to_pylist():
            rgb = np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB"))
            images.append(rgb.transpose(2, 0, 1))
        labels.extend(table.column("label").to_pylist())
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def load_dataset(name: str, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 (N, C, H, W) and labels, for the benchmark and the victim trainer."""
    if name == "fmnist":
        images, labels = load_fashion_mnist(split)
        return images[:, None], labels
    if name == "cifar10":
        return load_cifar10(split)
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
