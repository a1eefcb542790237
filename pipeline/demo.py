"""The embedded demo: a poisoned Fashion-MNIST shard set, sanitized by the real pipeline, scored against ground truth.

Half of the images carry the attack's trigger (all-to-one, target 0); the manifest (key -> true label, triggered)
stays beside the shards so the scoring can join on key after the pipeline has run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.attacks import TARGET, apply_trigger
from pipeline.datasets import load_fashion_mnist
from pipeline.decode import encode_png
from pipeline.metrics import attack_metrics, flag_confusion


def build_demo_shards(root: Path, n: int = 1000, attack: str = "badnets", n_shards: int = 4,
                      offset: int = 0) -> Path:
    """Write `n` test images (odd positions triggered) as Parquet shards under root/shards; return the manifest."""
    images, labels = load_fashion_mnist("test")
    idx = np.arange(offset, offset + n) % len(images)
    imgs, labs = images[idx], labels[idx]
    triggered = (np.arange(n) % 2 == 1)
    imgs = imgs.copy()
    if triggered.any():
        imgs[triggered] = apply_trigger(imgs[triggered], attack)
    keys = [f"fmnist-test-{i:05d}" + (f"-{attack}" if t else "") for i, t in zip(idx, triggered)]
    shard_dir = root / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    for old in shard_dir.glob("*.parquet"):
        old.unlink()
    pngs = encode_png(imgs[:, None])
    for s, part in enumerate(np.array_split(np.arange(n), n_shards)):
        pq.write_table(pa.table({"key": [keys[i] for i in part], "image": [pngs[i] for i in part],
                                 "label": labs[part]}), shard_dir / f"shard-{s:05d}.parquet")
    manifest = root / "manifest.parquet"
    pq.write_table(pa.table({"key": keys, "true_label": labs, "triggered": triggered,
                             "attack": [attack if t else None for t in triggered]}), manifest)
    return manifest


def score_output(output_dir: str, manifest: Path, target: int = TARGET) -> list[dict]:
    """Undefended (label on the original) vs defended (label on the purified image), from the pipeline's Parquet."""
    out = pads.dataset(output_dir, format="parquet").to_table(
        columns=["key", "pred_orig", "pred_purified", "flagged", "nfe", "error", "method"]).to_pandas()
    man = pq.read_table(manifest).to_pandas()
    df = man.merge(out, on="key", how="left")
    missing = int(df["pred_orig"].isna().sum())
    df = df.fillna({"pred_orig": -1, "pred_purified": -1, "flagged": False, "nfe": 0.0})
    clean, trig = df[~df.triggered], df[df.triggered]
    rows = []
    for name, col in (("undefended", "pred_orig"), ("defended", "pred_purified")):
        m = attack_metrics(clean[col].to_numpy(), clean.true_label.to_numpy(), trig[col].to_numpy(),
                           trig.true_label.to_numpy(), target)
        row = {"model": name, "ca": m["ca"], "pa": m["pa"], "asr": m["asr"], "floor": m["floor"],
               "nfe": 0.0 if name == "undefended" else float(df["nfe"].mean()), "missing": missing}
        if name == "defended":
            fc = flag_confusion(df["flagged"].astype(bool).to_numpy(), df["triggered"].to_numpy())
            row.update(flag_precision=fc["precision"], flag_recall=fc["recall"])
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("| | CA | PA | ASR | ASR floor | flag precision | flag recall | mean NFE |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        fp = f"{r['flag_precision']:.3f}" if "flag_precision" in r else "-"
        fr = f"{r['flag_recall']:.3f}" if "flag_recall" in r else "-"
        lines.append(f"| {r['model']} | {r['ca']:.3f} | {r['pa']:.3f} | {r['asr']:.3f} | {r['floor']:.3f} | "
                     f"{fp} | {fr} | {r['nfe']:.1f} |")
    return "\n".join(lines)
