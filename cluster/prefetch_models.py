"""Bake hub diffusion models into the image as local folders under PIPELINE_MODELS_DIR.

Run at image build time (cluster/Dockerfile): `python prefetch/prefetch_models.py ddpm-cifar10-32 ...`. Each model is
loaded exactly the way the pipeline loads it (safetensors only), then saved as `MODELS_DIR/<hub id>/{unet,scheduler}`,
which `pipeline.purify.models.resolve_source` finds before it would ever ask the hub. GPU pods then start without
network access and without N actors hitting the hub at once.

The image runs it before the code is copied (so a code change does not download the weights again), with
`pipeline/purify/models.py` copied beside it: that module needs only torch and diffusers. In a checkout (the
cluster launcher's setup commands) the installed package is used.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from diffusers import DDPMScheduler

_BESIDE = Path(__file__).with_name("models.py")
if _BESIDE.is_file():
    _spec = importlib.util.spec_from_file_location("bbpurify_models", _BESIDE)
    _models = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _models  # dataclasses look their module up there
    _spec.loader.exec_module(_models)
    MODELS_DIR, load_model, resolve_source = _models.MODELS_DIR, _models.load_model, _models.resolve_source
else:
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
