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

The victim zoo (jobs/train_zoo.py) varies what a user's model may differ in: the architecture (``--arch``: the
SmallCNN, a wider VGG-style CNN with batch norm, a small ResNet, an MLP), the recipe (``--epochs``,
``--augment shift``, ``--label-smoothing``, ``--weight-decay``) and the attacker. ``--augment purifier`` is the
purifier-aware attacker: every training image, clean or poisoned, is blurred, noised or pooled down and up at random,
so that the backdoor answers to what a partial purification leaves of its trigger. ``--augment defense`` is the
defense-aware (adaptive) attacker, who knows the defense and its embedded model, as anyone can of an open one: every
poisoned image, and as many clean ones, is also seen as the default vote's own pass purified it, so that the
backdoor learns whatever of the trigger survives the defense, if anything does.
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


class WideCNN(nn.Module):
    """VGG-style: three conv blocks with batch norm (32, 64, 64), dropout before the head; ~0.2M parameters."""

    def __init__(self, num_classes: int = 10, channels: int = 1, size: int = 28, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(channels, width), *block(width, 2 * width), *block(2 * width, 2 * width))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * width * (size // 8) ** 2, 128),
                                  nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


class ResNet(nn.Module):
    """A small ResNet (stride-2 stem, three stages of one basic block: 16, 32, 64 channels, global average pool);
    ~0.1M parameters. Global pooling makes it the one victim that does not care where a feature is."""

    def __init__(self, num_classes: int = 10, channels: int = 1, size: int = 28, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stages = nn.Sequential(BasicBlock(width, width, 1), BasicBlock(width, 2 * width, 2),
                                    BasicBlock(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class MLP(nn.Module):
    """Two hidden layers (256, 128) on the raw pixels: no convolution, no translation prior; ~0.23M parameters."""

    def __init__(self, num_classes: int = 10, channels: int = 1, size: int = 28, width: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, width), nn.ReLU(),
                                 nn.Linear(width, width // 2), nn.ReLU(), nn.Linear(width // 2, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


ARCHS: dict[str, type[nn.Module]] = {"smallcnn": SmallCNN, "widecnn": WideCNN, "resnet": ResNet, "mlp": MLP}
DEFAULT_WIDTH = {"smallcnn": 16, "widecnn": 32, "resnet": 16, "mlp": 256}
AUGMENT = ("none", "shift", "purifier", "defense")


def shift(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to `pad` pixels per image (zero fill)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None]).to(x.device)  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None]).to(x.device)  # (n, w)
    idx = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def purifier_like(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """The purifier-aware attacker's augmentation: with probability `p` per image, one of a Gaussian blur (sigma
    0.5-1.5), Gaussian noise (std 0.03-0.15) or a 2x average-pool down and bilinear up, i.e. the kinds of damage a
    partial purification leaves on a trigger."""
    n = x.shape[0]
    kind = torch.randint(0, 3, (n,), generator=gen)
    use = torch.rand(n, generator=gen) < p
    out = x.clone()
    sel = (use & (kind == 0)).nonzero().flatten()
    if len(sel):
        sigma = 0.5 + torch.rand(1, generator=gen).item()
        r = torch.arange(-2, 3, dtype=x.dtype)
        g = torch.exp(-r ** 2 / (2 * sigma ** 2))
        g = (g / g.sum()).to(x.device)
        c = x.shape[1]
        xs = F.conv2d(F.pad(x[sel], (2, 2, 0, 0), mode="replicate"), g.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
        out[sel] = F.conv2d(F.pad(xs, (0, 0, 2, 2), mode="replicate"), g.view(1, 1, 5, 1).repeat(c, 1, 1, 1),
                            groups=c)
    sel = (use & (kind == 1)).nonzero().flatten()
    if len(sel):
        std = (0.03 + 0.12 * torch.rand(len(sel), 1, 1, 1, generator=gen)).to(x.device)
        noise = torch.randn(x[sel].shape, generator=gen).to(x.device)
        out[sel] = (x[sel] + std * noise).clamp(0, 1)
    sel = (use & (kind == 2)).nonzero().flatten()
    if len(sel):
        out[sel] = F.interpolate(F.avg_pool2d(x[sel], 2), size=x.shape[-2:], mode="bilinear", align_corners=False)
    return out


def defense_copies(images: np.ndarray, idx: np.ndarray, model_name: str, seed: int, batch: int = 256) -> np.ndarray:
    """The defense-aware attacker's augmentation: images[idx] as one pass of the default vote purifies them (the
    `cascade` method's own base pass, with `model_name`), uint8 in the images' layout. The attacker's seeds are its
    own; the passes' distribution is what the defense's will be."""
    from pipeline.purify import build_purifier, load_model
    from pipeline.purify.sampling import to_uint8

    base = build_purifier("cascade", load_model(model_name, torch.device("cpu"))).base
    out = np.empty((len(idx), *images.shape[1:]), np.uint8)
    for s in range(0, len(idx), batch):
        rows = idx[s:s + batch]
        out[s:s + len(rows)] = to_uint8(base(images[rows], [f"train-{i}" for i in rows], seed=seed).images)
    return out


def defense_augmentation(images: np.ndarray, poisoned: np.ndarray, seed: int,
                         dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(purified copies in [0, 1], each training row's index into them or -1) for the poisoned rows and as many clean
    ones, so that a purified look alone does not mean the target."""
    rest = np.setdiff1d(np.arange(len(images)), poisoned)
    picked = np.sort(np.concatenate([poisoned, np.random.default_rng(seed).choice(
        rest, size=min(len(poisoned), len(rest)), replace=False)]))
    t0 = time.time()
    purified = torch.from_numpy(defense_copies(images, picked, "fmnist-tiny", seed)).to(dev).float() / 255
    print(f"purified {len(picked)} training images with the defense's pass ({time.time() - t0:.0f}s)", flush=True)
    copy_row = torch.full((len(images),), -1, dtype=torch.long)
    copy_row[torch.from_numpy(picked)] = torch.arange(len(picked))
    return purified, copy_row.to(dev)


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
def probabilities(model: nn.Module, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Softmax (N, classes) of uint8 (N, C, H, W) images."""
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.array(images[i:i + batch])).to(dev).float().div_(255.0)
        out.append(model(x).softmax(1).cpu().numpy())
    return np.concatenate(out)


def predict(model: nn.Module, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Labels of uint8 (N, C, H, W) images."""
    return probabilities(model, images, batch).argmax(1)


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
    ap.add_argument("--arch", default="smallcnn", choices=tuple(ARCHS))
    ap.add_argument("--width", type=int, default=None,
                    help="channels of the first conv, or the MLP's first hidden layer (SmallCNN: 16; 64 is a fair "
                         "CIFAR-10 size)")
    ap.add_argument("--augment", default="none", choices=AUGMENT,
                    help="shift: random translation by up to 2 px; purifier: the purifier-aware attacker's blur / "
                         "noise / down-up augmentation of every training image; defense: the defense-aware "
                         "attacker's, every poisoned image and as many clean ones also seen purified by the default "
                         "vote's pass (Fashion-MNIST, the embedded model)")
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
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
    y_clean = y_train
    x_train, y_train, n_poison = poison(x_train, y_train, args.attack, args.poison_rate, args.target, args.seed)
    shape = tuple(int(v) for v in x_train.shape[1:])
    dev = torch.device(args.device)
    copy_row = purified = None
    if args.augment == "defense":
        if args.data != "fmnist":
            raise SystemExit("--augment defense purifies with the embedded Fashion-MNIST model: --data fmnist")
        purified, copy_row = defense_augmentation(x_train, np.flatnonzero(y_train != y_clean), args.seed, dev)

    width = args.width or DEFAULT_WIDTH[args.arch]
    model = ARCHS[args.arch](channels=shape[0], size=shape[1], width=width).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
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
            if args.augment == "shift":
                xb = shift(xb, gen)
            elif args.augment == "purifier":
                xb = purifier_like(xb, gen)
            elif copy_row is not None:  # half the time, an image the defense purified is seen as purified
                row = copy_row[b]
                swap = (row >= 0) & (torch.rand(len(b), generator=gen) < 0.5).to(dev)
                xb[swap] = purified[row[swap]]  # xt[b] is already a copy
            loss = F.cross_entropy(model(xb), yt[b], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        ca = float(np.mean(predict(model, x_test) == y_test))
        print(f"epoch {epoch + 1}/{args.epochs} loss {total / len(perm):.4f} CA {ca:.4f} ({time.time() - t0:.0f}s)",
              flush=True)

    result: dict = {"attack": args.attack, "data": args.data, "arch": args.arch, "width": width,
                    "augment": args.augment, "label_smoothing": args.label_smoothing,
                    "weight_decay": args.weight_decay, "lr": args.lr,
                    "params": sum(p.numel() for p in model.parameters()),
                    "poison_rate": args.poison_rate if args.attack != "none" else 0.0,
                    "n_poison": n_poison, "target": args.target, "epochs": args.epochs, "seed": args.seed,
                    "ca": float(np.mean(predict(model, x_test) == y_test)), "n_test": len(y_test)}
    # calibration: how often the victim is sure of a clean image (the vote's original-label gate reads this)
    top = probabilities(model, x_test).max(1)
    result["clean_top_prob_median"] = float(np.median(top))
    result["clean_top_prob_ge_95"] = float(np.mean(top >= 0.95))
    if args.attack != "none":
        keep = y_test != args.target
        pred = predict(model, apply_trigger(x_test[keep], args.attack))
        result["asr"] = float(np.mean(pred == args.target))
        result["pa"] = float(np.mean(pred == y_test[keep]))
        result["n_triggered"] = int(keep.sum())
        # what ASR would be with the trigger perfectly removed: clean non-target images labelled as the target
        result["floor"] = float(np.mean(predict(model, x_test[keep]) == args.target))
    if copy_row is not None:
        result["n_defense_purified"] = int((copy_row >= 0).sum())
    result["train_seconds"] = round(time.time() - t0, 1)

    export_onnx(model, args.out, shape)
    result["onnx_bytes"] = args.out.stat().st_size
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
