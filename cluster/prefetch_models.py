"""Bake hub diffusion models into the image as local folders under PIPELINE_MODELS_DIR.

Run at image build time (cluster/Dockerfile): `python cluster/prefetch_models.py ddpm-cifar10-32 ...`. Each model is
loaded exactly the way the pipeline loads it (safetensors only), then saved as `MODELS_DIR/<hub id>/{unet,scheduler}`,
which `pipeline.purify.models.resolve_source` finds before it would ever ask the hub. GPU pods then start without
network access and without N actors hitting the hub at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

from diffusers import DDPMScheduler

from pipeline.purify.models import MODELS_DIR, load_model, resolve_source


def prefetch(name: str) -> Path | None:
    source, _preset = resolve_source(name)
    if Path(source).is_dir():
        print(f"{name}: already local at {source}")
        return None
    model = load_model(name)  # fails here, at build time, if the hub copy has no safetensors
    dest = MODELS_DIR / source
    model.unet.save_pretrained(dest / "unet", safe_serialization=True)
    try:
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    except OSError:
        scheduler = DDPMScheduler.from_pretrained(source)
    scheduler.save_pretrained(dest / "scheduler")
    print(f"{name}: saved to {dest}")
    return dest


def main(argv: list[str]) -> int:
    for name in argv:
        prefetch(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
