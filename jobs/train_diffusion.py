"""Train the embedded DDPM (diffusers UNet2DModel, epsilon prediction) on a clean image set.

Checkpoints (model, EMA, optimizer, step) every --ckpt-every steps and on exit; rerunning the same command resumes.
The exported folder (`unet/` + `scheduler/`, safetensors) is what `pipeline.purify.models.load_model` reads.

    python jobs/train_diffusion.py --out models/fmnist-ddpm --steps 6000 --batch 128
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from pipeline.datasets import DATASETS, load_dataset
from pipeline.purify.models import build_unet


def load_images(data: str) -> np.ndarray:
    """uint8 (N, C, H, W) training images: a known dataset name ('fmnist', 'cifar10') or a folder of image files."""
    if data in DATASETS:
        return load_dataset(data, "train")[0]
    from PIL import Image

    files = sorted(p for p in Path(data).rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    arrs = [np.asarray(Image.open(p)) for p in files]
    arr = np.stack(arrs)
    return arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)


def export(unet, sched: DDPMScheduler, out: Path, meta: dict) -> None:
    unet.save_pretrained(out / "unet", safe_serialization=True)
    sched.save_pretrained(out / "scheduler")
    (out / "training.json").write_text(json.dumps(meta, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fmnist")
    ap.add_argument("--out", type=Path, default=Path("models/fmnist-ddpm"))
    ap.add_argument("--ckpt-dir", type=Path, default=Path("checkpoints/diffusion"))
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--init", type=Path, default=None,
                    help="start from an exported model folder (its unet/ weights) instead of random weights; "
                         "the optimizer, LR schedule and EMA start fresh")
    ap.add_argument("--schedule", default="linear", choices=["linear", "squaredcos_cap_v2"])
    ap.add_argument("--t-focus", type=int, default=500,
                    help="half of each batch draws t below this: purification only ever starts at t <= ~500")
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--time-budget", type=float, default=0, help="stop (and export) after this many seconds")
    ap.add_argument("--anneal-by-time", action="store_true",
                    help="run the cosine LR schedule over --time-budget seconds instead of --steps steps, so that "
                         "a run on a device of unknown speed ends annealed (training.json records the steps reached)")
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.anneal_by_time and not args.time_budget:
        ap.error("--anneal-by-time needs --time-budget")
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    torch.backends.cudnn.benchmark = dev.type == "cuda"

    images = load_images(args.data)
    n, c, h, _ = images.shape
    data = torch.from_numpy(images).to(dev)
    if args.init:
        from diffusers import UNet2DModel

        unet = UNet2DModel.from_pretrained(args.init, subfolder="unet", use_safetensors=True).to(dev)
        unet.requires_grad_(True)
    else:
        unet = build_unet(h, c, args.width).to(dev)
    init_meta = json.loads((args.init / "training.json").read_text()) if args.init and (
        args.init / "training.json").exists() else {}
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=args.schedule)
    # foreach: one fused update instead of a kernel launch per tensor, which dominates a small model's GPU step
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=0.75,
                   foreach=dev.type == "cuda")
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    step, elapsed, losses = 0, 0.0, []
    if args.anneal_by_time:
        def by_time(s: int) -> float:  # the same warm-up; cosine over the budget, reaching zero however few steps
            return min(1.0, s / 200) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, elapsed / args.time_budget)))

        lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, by_time)
    else:
        lr_sched = get_cosine_schedule_with_warmup(opt, 200, args.steps)
    acp = sched.alphas_cumprod.to(dev, torch.float32)

    ckpt = args.ckpt_dir / "last.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location=dev, weights_only=True)
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["opt"])
        lr_sched.load_state_dict(state["lr"])
        ema.load_state_dict(state["ema"])
        step, elapsed, losses = state["step"], state["elapsed"], state["losses"]
        torch.set_rng_state(state["rng"])
        print(f"resumed from {ckpt} at step {step}")

    def save() -> None:
        args.ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"unet": unet.state_dict(), "opt": opt.state_dict(), "lr": lr_sched.state_dict(),
                    "ema": ema.state_dict(), "step": step, "elapsed": elapsed, "losses": losses,
                    "rng": torch.get_rng_state()}, tmp)
        tmp.replace(ckpt)  # atomic: a crash mid-save leaves the previous checkpoint intact
        ema_unet = copy.deepcopy(unet)
        ema.copy_to(ema_unet.parameters())
        meta = {"command": "python jobs/train_diffusion.py " + " ".join(
                    f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
                    if k not in {"out", "ckpt_dir"} and v is not None and v is not False),
                "steps": step, "batch": args.batch,
                "samples_seen": step * args.batch + init_meta.get("samples_seen", 0),
                "train_seconds": round(elapsed + init_meta.get("train_seconds", 0), 1),
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
                "final_loss_ema100": float(np.mean(losses[-100:])) if losses else None,
                "parameters": sum(p.numel() for p in unet.parameters()), "schedule": args.schedule,
                "data": args.data, "num_images": int(n)}
        if init_meta:
            meta["init"] = init_meta  # the run this one continued: totals above include it
        export(ema_unet, sched, args.out, meta)

    bar = tqdm(total=args.steps, initial=step, desc="train", mininterval=10)
    t_start = time.time() - elapsed
    unet.train()
    while step < args.steps:
        idx = torch.randint(0, n, (args.batch,), device=dev)
        x0 = data[idx].float() / 127.5 - 1.0
        flip = torch.rand(args.batch, device=dev) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        half = args.batch // 2
        t = torch.cat([torch.randint(0, 1000, (args.batch - half,), device=dev),
                       torch.randint(0, args.t_focus, (half,), device=dev)])
        noise = torch.randn_like(x0)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        step += 1
        losses.append(float(loss.detach()))
        losses = losses[-1000:]
        elapsed = time.time() - t_start
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}", lr=f"{lr_sched.get_last_lr()[0]:.1e}")
        if step % args.ckpt_every == 0:
            save()
        if args.time_budget and elapsed > args.time_budget:
            print(f"time budget reached at step {step}")
            break
    save()
    print(f"done: step {step}, loss {np.mean(losses[-100:]):.4f}, {elapsed:.0f}s; exported to {args.out}")
    assert math.isfinite(float(np.mean(losses[-100:])))


if __name__ == "__main__":
    main()
