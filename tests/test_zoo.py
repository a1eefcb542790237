"""The victim zoo: the trainer's architectures and the purifier-aware recipe, the committed zoo, and the zoo
benchmark end to end on committed victims (memoised purification must not change a single answer)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from pipeline.attacks import TARGET, apply_trigger
from pipeline.datasets import load_dataset
from pipeline.zoo import DEFAULT_LABEL

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "models" / "zoo"
sys.path.insert(0, str(ROOT / "jobs"))

import train_victim  # noqa: E402
import train_zoo  # noqa: E402


@pytest.mark.parametrize("arch", sorted(train_victim.ARCHS))
def test_each_architecture_trains_and_exports(arch: str, tmp_path: Path) -> None:
    model = train_victim.ARCHS[arch](width=train_victim.DEFAULT_WIDTH[arch])
    x = torch.rand(8, 1, 28, 28)
    assert model(x).shape == (8, 10)
    out = tmp_path / f"{arch}.onnx"
    train_victim.export_onnx(model, out, (1, 28, 28))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input-0": x.numpy()})[0]
    np.testing.assert_allclose(got, model.eval()(x).detach().numpy(), atol=1e-4)


def test_augmentations_keep_shape_range_and_change_images() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 28, 28)
    s = train_victim.shift(x, gen)
    assert s.shape == x.shape and not torch.equal(s, x)
    # a shift moves content, it does not invent it: every output value is an input value or the zero fill
    assert torch.isin(s.unique(), torch.cat([x.unique(), torch.zeros(1)])).all()
    p = train_victim.purifier_like(x, torch.Generator().manual_seed(1), p=1.0)
    assert p.shape == x.shape and float(p.min()) >= 0 and float(p.max()) <= 1
    assert (p - x).abs().flatten(1).amax(1).gt(0).all(), "with p=1 every image is degraded"


def train_victim_run(out: Path, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    """jobs/train_victim.py as a user runs it, one epoch on CPU: (the run, its result file)."""
    run = subprocess.run([sys.executable, "jobs/train_victim.py", "--attack", "badnets", *flags, "--epochs", "1",
                          "--device", "cpu", "--out", str(out)], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return run, json.loads(out.with_suffix(".json").read_text())


def test_purifier_aware_victim_trains_end_to_end(tmp_path: Path) -> None:
    _, info = train_victim_run(tmp_path / "mlp-aware.onnx", "--arch", "mlp", "--augment", "purifier",
                               "--label-smoothing", "0.1")
    assert info["arch"] == "mlp" and info["augment"] == "purifier" and info["label_smoothing"] == 0.1
    assert info["ca"] > 0.7 and info["asr"] > 0.5 and 0 <= info["clean_top_prob_ge_95"] <= 1


def test_defense_aware_victim_trains_through_the_defenses_own_pass(tmp_path: Path) -> None:
    # A small poison rate keeps the purification short: 60 poisoned images and 60 clean ones, one pass each.
    run, info = train_victim_run(tmp_path / "smallcnn-adaptive.onnx", "--arch", "smallcnn", "--augment", "defense",
                                 "--poison-rate", "0.001")
    assert "purified 120 training images with the defense's pass" in run.stdout
    assert info["augment"] == "defense" and info["n_poison"] == 60 and info["n_defense_purified"] == 120
    assert info["ca"] > 0.7
    # Named only: the default zoo run leaves it out, an --only run finds it.
    assert not any(e["attack"] == "adaptive" for e in train_zoo.zoo())
    extra = {e["name"]: e for e in train_zoo.zoo(extra=True)}
    assert extra["mlp-adaptive"]["recipe"]["augment"] == "defense"
    assert {e["name"] for e in train_zoo.zoo()} < set(extra)


def test_committed_zoo_is_what_its_manifest_says() -> None:
    from pipeline.zoo import load_zoo

    victims = load_zoo(ZOO)
    names = {v["name"] for v in victims}
    assert names == {e["name"] for e in train_zoo.zoo()}, "every architecture x attack is trained and listed"
    assert len({v["arch"] for v in victims}) >= 4
    x, y = load_dataset("fmnist", "test")
    x, y = x[:300], y[:300]
    keep = y != TARGET
    for v in victims:
        sess = ort.InferenceSession(str(v["path"]), providers=["CPUExecutionProvider"])

        def labels(images: np.ndarray, sess: ort.InferenceSession = sess) -> np.ndarray:
            return sess.run(["logits"], {"input-0": images.astype(np.float32) / 255})[0].argmax(1)

        ca = float(np.mean(labels(x) == y))
        asr = float(np.mean(labels(apply_trigger(x[keep], v["trigger"])) == TARGET))
        assert ca > 0.8 and asr > 0.8, (v["name"], ca, asr)
        assert abs(ca - v["result"]["ca"]) < 0.05, v["name"]
        assert v["path"].stat().st_size < 2_000_000


def test_zoo_bench_end_to_end(tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    picked = [v for v in json.loads((ZOO / "zoo.json").read_text())["victims"]
              if v["name"] in ("mlp-aware", "resnet-patchmove")]
    for v in picked:
        (zoo / v["file"]).write_bytes((ZOO / v["file"]).read_bytes())
    (zoo / "zoo.json").write_text(json.dumps({"target": 0, "victims": picked}))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline", "zoo", "--zoo", str(zoo), "--n", "24",
           "--only", f"none,sdedit-250,{DEFAULT_LABEL}", "--out", str(out), "--memo", str(tmp_path / "m")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    rows = {(r["victim"], r["label"]): r for r in res["rows"]}
    assert len(rows) == 6
    x, y = load_dataset("fmnist", "test")
    for v in picked:
        sess = ort.InferenceSession(str(zoo / v["file"]), providers=["CPUExecutionProvider"])
        pred = sess.run(["logits"], {"input-0": x[:24].astype(np.float32) / 255})[0].argmax(1)
        none = rows[(v["name"], "none")]
        assert none["ca"] == pytest.approx(float(np.mean(pred == y[:24]))) and none["nfe"] == 0
        vote = rows[(v["name"], DEFAULT_LABEL)]
        assert vote["n_clean"] == 24 and vote["n_triggered"] == int(np.sum(y[:24] != TARGET))
        assert 8 <= vote["nfe"] <= 40 and vote["ca_undefended"] == none["ca"]
        assert vote["lost"] - vote["won"] == round(vote["ca_drop"] * 24)
        assert sum(b["clean"] for b in vote["lost_won_by_confidence"]) == 24
        # too few rows for any class to be judged: no sink, and no draw smaller than the rows there are
        assert vote["sink"] is None and vote["sink_draws"] == {}
    summary = {s["label"]: s for s in res["summary"]}
    worst = max((rows[(v["name"], "sdedit-250")] for v in picked), key=lambda r: r["ca_drop"])
    assert summary["sdedit-250"]["ca_drop"]["worst"] == worst["ca_drop"]
    assert "Spread across victims" in (out / "results.md").read_text()
    assert f"| {DEFAULT_LABEL} | 2 | 0 |" in (out / "results.md").read_text()  # the sink check's row

    # A second run reads the memo and must give the same answers, computing no image again.
    run2 = subprocess.run([*cmd[:-4], "--out", str(out / "again"), "--memo", str(tmp_path / "m")], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert run2.returncode == 0, run2.stderr[-2000:]
    assert f"{DEFAULT_LABEL}: 0 images purified" in run2.stdout
    again = json.loads((out / "again" / "results.json").read_text())["rows"]
    assert [r["ca"] for r in again] == [r["ca"] for r in res["rows"]]
    assert [r["asr"] for r in again] == [r["asr"] for r in res["rows"]]

    # --merge: one victim run again into the same results keeps the other victim's rows; a run of another size is
    # refused instead of mixing two measurements.
    merge = [*cmd[:-4], "--victims", "mlp-aware", "--merge", "--out", str(out), "--memo", str(tmp_path / "m")]
    run3 = subprocess.run(merge, cwd=ROOT, env=env, capture_output=True, text=True)
    assert run3.returncode == 0, run3.stderr[-2000:]
    merged = json.loads((out / "results.json").read_text())
    assert merged["meta"]["victims"] == 2 and merged["meta"]["victims_merged"] == 1
    assert merged["meta"]["rows_merged"] == 3
    assert {(r["victim"], r["label"]): r["ca"] for r in merged["rows"]} == {k: r["ca"] for k, r in rows.items()}
    # A method run alone on every victim joins the others' rows, which stay as they were.
    plus = [*cmd[:-6], "--only", "guided", "--merge", "--out", str(out), "--memo", str(tmp_path / "m")]
    run5 = subprocess.run(plus, cwd=ROOT, env=env, capture_output=True, text=True)
    assert run5.returncode == 0, run5.stderr[-2000:]
    joined = json.loads((out / "results.json").read_text())
    assert joined["meta"]["rows_merged"] == 6 and len(joined["rows"]) == 8
    assert {(r["victim"], r["label"]): r["ca"] for r in joined["rows"] if r["label"] != "guided"} == \
        {k: r["ca"] for k, r in rows.items()}
    assert {s["label"] for s in joined["summary"]} == {"none", "sdedit-250", DEFAULT_LABEL, "guided"}
    # ...and the report still counts the default's lost and won clean images, not those of the method run last.
    assert f"under {DEFAULT_LABEL}:" in (out / "results.md").read_text()
    other = [("16" if a == "24" else a) for a in merge]
    run4 = subprocess.run(other, cwd=ROOT, env=env, capture_output=True, text=True)
    assert run4.returncode != 0 and "--merge" in run4.stderr

    # --offset: the next test images, held out from the first ones; a run at another offset is not merged into this
    # one, and images past the end of the test set are refused.
    held = [*cmd[:-6], "--victims", "mlp-aware", "--only", "none", "--offset", "24"]
    run8 = subprocess.run([*held, "--out", str(out / "held")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run8.returncode == 0, run8.stderr[-2000:]
    held_res = json.loads((out / "held" / "results.json").read_text())
    aware = next(v for v in picked if v["name"] == "mlp-aware")
    sess = ort.InferenceSession(str(zoo / aware["file"]), providers=["CPUExecutionProvider"])
    pred = sess.run(["logits"], {"input-0": x[24:48].astype(np.float32) / 255})[0].argmax(1)
    assert held_res["meta"]["offset"] == 24 and held_res["rows"][0]["ca"] == pytest.approx(np.mean(pred == y[24:48]))
    assert "24 test images from index 24 (clean)" in (out / "held" / "results.md").read_text()
    run9 = subprocess.run([*held, "--merge", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run9.returncode != 0 and "--merge" in run9.stderr and "'offset': 0" in run9.stderr
    past = [*held[:-1], "9990", "--out", str(out / "past")]
    run10 = subprocess.run(past, cwd=ROOT, env=env, capture_output=True, text=True)
    assert run10.returncode != 0 and "within the 10000 test images" in run10.stderr
    # The memo names each image by its bytes, key and seed, so a run over other images reuses the ones they share:
    # from offset 12, images 12-23 (clean and triggered) are replayed and only 24-35 are purified.
    shifted = [*held[:-1], "12", "--only", "sdedit-250", "--out", str(out / "shifted"), "--memo", str(tmp_path / "m")]
    run11 = subprocess.run(shifted, cwd=ROOT, env=env, capture_output=True, text=True)
    assert run11.returncode == 0, run11.stderr[-2000:]
    assert f"sdedit-250: {12 + int(np.sum(y[24:36] != TARGET))} images purified" in run11.stdout, run11.stdout

    # Retrained weights under the same preset name: the memo's images are not replayed, and merging into results
    # made with the old weights is refused.
    from pipeline.purify import load_model

    retrained = tmp_path / "models" / "fmnist-ddpm"
    model = load_model("fmnist-tiny", "cpu")
    with torch.no_grad():
        next(model.unet.parameters()).mul_(1.01)
    model.unet.save_pretrained(retrained / "unet", safe_serialization=True)
    shutil.copytree(ROOT / "models" / "fmnist-ddpm" / "scheduler", retrained / "scheduler")
    env_retrained = {**env, "PIPELINE_MODELS_DIR": str(retrained.parent)}
    alone = [*cmd[:-6], "--victims", "mlp-aware", "--only", "sdedit-250", "--out", str(out / "retrained"), "--memo",
             str(tmp_path / "m")]
    run6 = subprocess.run(alone, cwd=ROOT, env=env_retrained, capture_output=True, text=True)
    assert run6.returncode == 0, run6.stderr[-2000:]
    purified = re.search(r"sdedit-250: (\d+) images purified", run6.stdout)
    assert purified and int(purified.group(1)) > 24, run6.stdout
    run7 = subprocess.run(merge, cwd=ROOT, env=env_retrained, capture_output=True, text=True)
    assert run7.returncode != 0 and "--merge" in run7.stderr and "weights" in run7.stderr


def test_memo_replays_the_purifier_exactly() -> None:
    from pipeline.purify import Cascade, build_purifier, load_model
    from pipeline.zoo import MemoPurifier

    model = load_model("fmnist-tiny", "cpu")
    base = build_purifier("sdedit", model, {"t_start": 200, "steps": 2})
    x, _ = load_dataset("fmnist", "test")
    x = x[:6]
    keys = [f"k{i}" for i in range(6)]
    memo = MemoPurifier(base)
    first = memo(x[:4], keys[:4], 3).uint8()
    both = memo(x, keys, 3)
    assert memo.computed == 6, "only the two new images are purified"
    assert np.array_equal(both.uint8(), base(x, keys, 3).uint8()) and np.array_equal(first, both.uint8()[:4])
    memo(x[:2], keys[:2], 4)
    assert memo.computed == 8, "another seed is another image"

    def classify(images: np.ndarray) -> np.ndarray:
        return (images.reshape(len(images), -1).mean(1) > 60).astype(np.int64)

    vote = Cascade(base, k=3)
    a = vote.run(x, keys, 0, classify)
    vote.base = MemoPurifier(base)
    b = vote.run(x, keys, 0, classify)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.nfe, b.nfe) and np.array_equal(a.images, b.images)
