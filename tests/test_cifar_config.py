"""The documented GPU configuration for CIFAR-10-sized models, run end to end on CPU with stand-ins: a small parquet
set in the hub's CIFAR-10 layout, a victim trained by jobs/train_victim.py on it, and a random 32x32 RGB DDPM saved
with save_pretrained. What a GPU user runs differs only in sizes, the device and the hub model (see README)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.datasets import load_cifar10, load_dataset

ROOT = Path(__file__).resolve().parents[1]


def write_split(path: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(n) % 10
    cells = []
    for i, img in enumerate(imgs):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        cells.append({"bytes": buf.getvalue(), "path": f"{i}.png"})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"img": cells, "label": pa.array(labels, pa.int64())}), path)
    return imgs.transpose(0, 3, 1, 2), labels


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    root = tmp_path_factory.mktemp("cifar10")
    write_split(root / "plain_text" / "train-00000-of-00001.parquet", 60, 0)
    x, y = write_split(root / "plain_text" / "test-00000-of-00001.parquet", 20, 1)
    return root, x, y


def test_cifar10_loader_reads_the_hub_parquet_layout(cifar_dir, monkeypatch):
    root, x, y = cifar_dir
    monkeypatch.setenv("CIFAR10_DIR", str(root))
    images, labels = load_dataset("cifar10", "test")
    assert images.shape == (20, 3, 32, 32) and images.dtype == np.uint8
    assert np.array_equal(images, x) and np.array_equal(labels, y)
    assert load_cifar10("train", root)[0].shape == (60, 3, 32, 32)


def test_cifar10_missing_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="CIFAR10_DIR"):
        load_cifar10("test")
    with pytest.raises(FileNotFoundError, match="no test parquet"):
        load_cifar10("test", tmp_path)


def test_cifar10_victim_and_benchmark_end_to_end(cifar_dir, tmp_path):
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    root, _, _ = cifar_dir
    env = {**os.environ, "CIFAR10_DIR": str(root), "HF_HUB_OFFLINE": "1"}
    victims = tmp_path / "victims"
    run = subprocess.run([sys.executable, "jobs/train_victim.py", "--data", "cifar10", "--attack", "badnets",
                          "--width", "8", "--epochs", "1", "--flip", "--device", "cpu",
                          "--out", str(victims / "badnets.onnx")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    info = json.loads((victims / "badnets.json").read_text())
    assert info["data"] == "cifar10" and info["n_test"] == 20 and 0 <= info["asr"] <= 1

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4)
    model = tmp_path / "ddpm-rgb32"
    unet.save_pretrained(model / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(model / "scheduler")

    out = tmp_path / "bench"
    run = subprocess.run([sys.executable, "-m", "pipeline", "bench", "--data", "cifar10", "--victims", str(victims),
                          "--model", str(model), "--attacks", "badnets", "--n", "12", "--only", "none,sdedit-200",
                          "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["data"] == "cifar10"
    rows = {r["label"]: r for r in res["rows"]}
    assert set(rows) == {"none", "sdedit-200"}
    assert rows["none"]["nfe"] == 0 and rows["sdedit-200"]["nfe"] == 10
    assert all(0 <= r[m] <= 1 for r in rows.values() for m in ("ca", "pa", "asr"))
    assert (out / "pareto.png").stat().st_size > 0 and "t_start=200" in (out / "results.md").read_text()

    # --update redoes the named rows only, keeps the others, and refuses results made with other settings.
    bench = [sys.executable, "-m", "pipeline", "bench", "--data", "cifar10", "--victims", str(victims), "--model",
             str(model), "--attacks", "badnets", "--only", "none", "--update", "--out", str(out)]
    run = subprocess.run([*bench, "--n", "12"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    again = {r["label"]: r for r in res["rows"]}
    assert set(again) == {"none", "sdedit-200"} and again["sdedit-200"] == rows["sdedit-200"]
    assert all(again["none"][m] == rows["none"][m] for m in ("ca", "pa", "asr", "floor"))  # deterministic
    assert [r["labels"] for r in res["meta"]["runs"]] == [["none", "sdedit-200"], ["none"]]
    run = subprocess.run([*bench, "--n", "10"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "other n" in run.stderr
