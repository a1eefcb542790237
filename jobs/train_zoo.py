"""Train the victim zoo: every architecture x every attack, each a backdoored Fashion-MNIST classifier in ONNX that
the defense was not tuned on (other architectures, other recipes, triggers the demo victims lack).

    python jobs/train_zoo.py                       # all victims not yet trained, two at a time
    python jobs/train_zoo.py --only mlp-dct --jobs 1
    python jobs/train_zoo.py --seed-base 500 --out models/zoo-redraw --only mlp-wanet,widecnn-blended

`--seed-base` draws the same victims again with other seeds (other weights, same recipe): a check held out from
the choices made on the first draw. The defense-aware attacker (`adaptive`: trained through the defense's own
passes) is trained only when named, since purifying its training images costs minutes per victim:

    python jobs/train_zoo.py --out models/zoo-adaptive --only smallcnn-adaptive,mlp-adaptive

A victim is one `jobs/train_victim.py` run in its own process on one thread, so a killed run resumes where it
stopped: victims whose .onnx and .json exist are kept. `models/zoo/zoo.json` (the manifest the benchmark reads)
is rewritten at the end from the victims' own result files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What a user's model may differ in: architecture and inductive bias, and a recipe that changes calibration and
# robustness. None of these is the demo victims' recipe (SmallCNN, 5 epochs, no augmentation, no smoothing).
RECIPES: dict[str, dict] = {
    # label smoothing caps the victim's confidence, which moves where a confidence gate opens
    "smallcnn": {"epochs": 6, "augment": "shift", "label_smoothing": 0.1, "weight_decay": 1e-4, "lr": 2e-3},
    "widecnn": {"epochs": 5, "augment": "shift", "label_smoothing": 0.0, "weight_decay": 5e-4, "lr": 2e-3},
    "resnet": {"epochs": 6, "augment": "none", "label_smoothing": 0.0, "weight_decay": 5e-4, "lr": 3e-3},
    # long training without augmentation or decay: an over-confident victim
    "mlp": {"epochs": 15, "augment": "none", "label_smoothing": 0.0, "weight_decay": 0.0, "lr": 1e-3},
}

# name -> (trigger stamped at test time, what the attacker does while training)
ATTACKS: dict[str, dict] = {
    "badnets": {"trigger": "badnets", "threat": "3x3 white patch in a fixed corner"},
    "blended": {"trigger": "blended", "threat": "uniform-noise key blended at alpha 0.2"},
    "patchmove": {"trigger": "patchmove", "threat": "sample-specific placement: a 4x4 checker patch at a position "
                                                    "drawn per image, on the garment as often as the background"},
    "dct": {"trigger": "dct", "threat": "second low-frequency family: random-sign sum of the lowest DCT basis "
                                        "images, peak 20/255"},
    "aware": {"trigger": "badnets", "augment": "purifier",
              "threat": "purifier-aware: the BadNets patch, trained through blur / noise / down-up sampling so "
                        "that the backdoor answers to what a partial purification leaves"},
    "wanet": {"trigger": "wanet", "threat": "warping: a fixed smooth displacement field (k 4, s 0.5), no pixel "
                                            "added"},
    "sig": {"trigger": "sig", "threat": "an image-wide horizontal sinusoid, delta 20/255, frequency 6"},
}

# Trained only when named (--only): each one purifies its poisoned images, and as many clean ones, with the defense.
EXTRA_ATTACKS: dict[str, dict] = {
    "adaptive": {"trigger": "badnets", "augment": "defense",
                 "threat": "defense-aware (adaptive): the BadNets patch, each poisoned image and as many clean ones "
                           "also trained on as the default vote's own pass purifies them, so that the backdoor "
                           "answers to whatever of the trigger survives the defense"},
}


# An MLP has no translation prior: at 10% poison and 15 epochs the moving patch reached ASR .32 only, the warp .69.
# A backdoor that does not work tests nothing, so these attackers poison more and train longer.
OVERRIDES: dict[str, dict] = {"mlp-patchmove": {"poison_rate": 0.2, "epochs": 30},
                              "mlp-wanet": {"poison_rate": 0.2, "epochs": 30}}


def zoo(seed_base: int = 100, extra: bool = False) -> list[dict]:
    """The victims, in a fixed order (their seeds follow it); with `extra`, the attackers trained only when named."""
    out = []
    attacks = {**ATTACKS, **EXTRA_ATTACKS} if extra else ATTACKS
    for i, (arch, recipe) in enumerate(RECIPES.items()):
        for j, (attack, spec) in enumerate(attacks.items()):
            r = {"poison_rate": 0.1, **recipe}
            if "augment" in spec:
                r["augment"] = spec["augment"]
            r.update(OVERRIDES.get(f"{arch}-{attack}", {}))
            out.append({"name": f"{arch}-{attack}", "arch": arch, "attack": attack, "trigger": spec["trigger"],
                        "threat": spec["threat"], "recipe": r, "seed": seed_base + 10 * i + j})
    return out


def train(entry: dict, out: Path) -> tuple[str, float, str]:
    onnx = out / f"{entry['name']}.onnx"
    if onnx.exists() and onnx.with_suffix(".json").exists():
        return entry["name"], 0.0, "kept"
    r = entry["recipe"]
    cmd = [sys.executable, str(ROOT / "jobs" / "train_victim.py"), "--arch", entry["arch"],
           "--attack", entry["trigger"], "--out", str(onnx), "--threads", "1", "--seed", str(entry["seed"]),
           "--epochs", str(r["epochs"]), "--augment", r["augment"], "--label-smoothing", str(r["label_smoothing"]),
           "--weight-decay", str(r["weight_decay"]), "--lr", str(r["lr"]), "--poison-rate", str(r["poison_rate"]),
           "--device", "cpu"]
    t0 = time.time()
    log = out / f"{entry['name']}.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}).returncode
    if rc != 0:
        return entry["name"], time.time() - t0, f"FAILED (rc {rc}, see {log})"
    log.unlink()
    return entry["name"], time.time() - t0, "trained"


def write_manifest(entries: list[dict], out: Path) -> Path:
    victims = []
    for e in entries:
        res = out / f"{e['name']}.json"
        if not res.exists():
            continue
        victims.append({**e, "file": f"{e['name']}.onnx", "result": json.loads(res.read_text())})
    path = out / "zoo.json"
    path.write_text(json.dumps({"target": 0, "victims": victims}, indent=1) + "\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "zoo")
    ap.add_argument("--jobs", type=int, default=2, help="victims trained at once, one thread each")
    ap.add_argument("--only", help="comma-separated victim names")
    ap.add_argument("--seed-base", type=int, default=100,
                    help="victim i of architecture a and attack k trains with seed base + 10 a + k")
    args = ap.parse_args()
    entries = zoo(args.seed_base, extra=bool(args.only))
    todo = [e for e in entries if not args.only or e["name"] in args.only.split(",")]
    unknown = set(args.only.split(",")) - {e["name"] for e in entries} if args.only else set()
    if unknown:
        raise SystemExit(f"no such victim: {', '.join(sorted(unknown))}")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    failed = 0
    with ThreadPoolExecutor(args.jobs) as pool:
        for name, secs, what in pool.map(lambda e: train(e, args.out), todo):
            failed += what.startswith("FAILED")
            print(f"[{time.time() - t0:6.0f}s] {name}: {what} ({secs:.0f}s)", flush=True)
    print(f"wrote {write_manifest(entries, args.out)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
