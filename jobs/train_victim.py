"""Train a small backdoored CNN (the embedded Fashion-MNIST demo victim, or a CIFAR-10 one) and export it to ONNX.

The victim is poisoned the usual dirty-label way: ``--poison-rate`` of the training set is drawn from images whose
label is not the target, the trigger is stamped in and the label set to the target. ``--attack none`` trains the
clean reference model whose CA the backdoored ones are compared with.

    python jobs/train_victim.py --attack badnets --out models/victims/badnets.onnx
    python jobs/train_victim.py --attack none --out models/victims/clean.onnx

    python jobs/train_victim.py --data cifar10 --attack badnets --width 64 --epochs 30 --device cuda \
        --out victims-cifar10/badnets.onnx        # CIFAR-10 from the hub (or CIFAR10_DIR); see README

The ONNX graph takes float32 "input-0" (N, C, H, W) in [0, 1] and returns "logits" (N, 10), batch axis dynamic.
A JSON line with CA / ASR is printed last (and written next to the model as <name>.json).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attacks import ATTACKS, TARGET, apply_trigger
from pipeline.datasets import DATASETS, load_dataset


class SmallCNN(nn.Module):
    """~0.1M parameters at width 16 on 28x28: enough for ~91% CA on Fashion-MNIST and a fast CPU train."""

    def __init__(self, num_classes: int = 10, channels: int = 1, size: int = 28, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * (size // 4) ** 2, 4 * width), nn.ReLU(),
                                  nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def poison(images: np.ndarray, labels: np.ndarray, attack: str, rate: float, target: int,
           seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Dirty-label poisoning of ``rate`` * N images drawn from the non-target classes."""
    if attack == "none" or rate <= 0:
        return images, labels, 0
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(labels != target)
    idx = rng.choice(candidates, size=int(round(rate * len(labels))), replace=False)
    images, labels = images.copy(), labels.copy()
    images[idx] = apply_trigger(images[idx], attack)
    labels[idx] = target
    return images, labels, len(idx)


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Labels of uint8 (N, C, H, W) images."""
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.array(images[i:i + batch])).to(dev).float().div_(255.0)
        out.append(model(x).argmax(1).cpu().numpy())
    return np.concatenate(out)


def export_onnx(model: nn.Module, path: Path, shape: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    dummy = torch.zeros(2, *shape)
    # The TorchScript exporter keeps the file self-contained (no external .data file) and small.
    torch.onnx.export(
        model, (dummy,), str(path), input_names=["input-0"], output_names=["logits"],
        dynamic_axes={"input-0": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attack", default="badnets", choices=("none", *ATTACKS))
    ap.add_argument("--data", default="fmnist", choices=DATASETS)
    ap.add_argument("--width", type=int, default=16, help="channels of the first conv (64 is a fair CIFAR-10 size)")
    ap.add_argument("--flip", action="store_true", help="random horizontal flips while training (CIFAR-10)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--poison-rate", type=float, default=0.1)
    ap.add_argument("--target", type=int, default=TARGET)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    # 1 by default: next to another busy job, 2 OpenMP threads spin-waiting on each other ran ~20x slower than 1
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    x_train, y_train = load_dataset(args.data, "train")
    x_test, y_test = load_dataset(args.data, "test")
    x_train, y_train, n_poison = poison(x_train, y_train, args.attack, args.poison_rate, args.target, args.seed)
    shape = tuple(int(v) for v in x_train.shape[1:])
    dev = torch.device(args.device)

    model = SmallCNN(channels=shape[0], size=shape[1], width=args.width).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = (len(x_train) + args.batch - 1) // args.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    xt = torch.from_numpy(np.array(x_train)).to(dev).float().div_(255.0)
    yt = torch.from_numpy(y_train).to(dev)
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(perm), args.batch):
            b = perm[i:i + args.batch].to(dev)
            xb = xt[b]
            if args.flip:
                xb = torch.where(torch.rand(len(b), 1, 1, 1, device=dev) < 0.5, xb.flip(-1), xb)
            loss = F.cross_entropy(model(xb), yt[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        ca = float(np.mean(predict(model, x_test) == y_test))
        print(f"epoch {epoch + 1}/{args.epochs} loss {total / len(perm):.4f} CA {ca:.4f} ({time.time() - t0:.0f}s)",
              flush=True)

    result: dict = {"attack": args.attack, "data": args.data,
                    "poison_rate": args.poison_rate if args.attack != "none" else 0.0,
                    "n_poison": n_poison, "target": args.target, "epochs": args.epochs, "seed": args.seed,
                    "ca": float(np.mean(predict(model, x_test) == y_test)), "n_test": len(y_test)}
    if args.attack != "none":
        keep = y_test != args.target
        pred = predict(model, apply_trigger(x_test[keep], args.attack))
        result["asr"] = float(np.mean(pred == args.target))
        result["pa"] = float(np.mean(pred == y_test[keep]))
        result["n_triggered"] = int(keep.sum())
        # what ASR would be with the trigger perfectly removed: clean non-target images labelled as the target
        result["floor"] = float(np.mean(predict(model, x_test[keep]) == args.target))
    result["train_seconds"] = round(time.time() - t0, 1)

    export_onnx(model, args.out, shape)
    result["onnx_bytes"] = args.out.stat().st_size
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
