"""Named diffusion-model presets and loading of a diffusers UNet2DModel + DDPM schedule (safetensors only).

Every purifier runs on a noise-predicting UNet and the discrete schedule it was trained with (DDPM: Ho, Jain and
Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020); only `alphas_cumprod` of the schedule is used.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

# Not pipeline.paths: the container image runs this file alone (cluster/prefetch_models.py) to fetch the weights.
REPO_ROOT = Path(__file__).resolve().parents[2]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MODELS_DIR = Path(os.environ.get("PIPELINE_MODELS_DIR", REPO_ROOT / "models"))


@dataclass(frozen=True)
class ModelPreset:
    name: str
    source: str  # local folder (relative to MODELS_DIR) or a hub id
    image_size: int
    channels: int
    description: str = ""
    # The domain's black level (in [0, 1]; 0 = none): on an image with at least `veil_share` of its pixels in
    # (0, black_level), a veil the data never has, pixels darker than this are background (see base.unveil).
    black_level: float = 0.0
    veil_share: float = 0.0


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        # black_level / veil_share: picked on one half of the test set and checked on another (docs/methods.md,
        # Unveiling).
        ModelPreset("fmnist-tiny", "fmnist-ddpm", 28, 1, "embedded: trained here on Fashion-MNIST", black_level=0.2,
                    veil_share=0.2),
        ModelPreset("ddpm-cifar10-32", "google/ddpm-cifar10-32", 32, 3, "hub: CIFAR-10 DDPM (needs network)"),
        ModelPreset("ddpm-celebahq-256", "google/ddpm-celebahq-256", 256, 3, "hub: CelebA-HQ DDPM (needs network)"),
    )
}


@dataclass
class DiffusionModel:
    """A UNet and the schedule it was trained with; what every purifier needs."""

    unet: UNet2DModel
    alphas_cumprod: torch.Tensor  # (T,) float64 on CPU
    image_size: int
    channels: int
    name: str = ""
    black_level: float = 0.0  # from the preset; see base.unveil
    veil_share: float = 0.0

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: str | torch.device) -> DiffusionModel:
        self.unet.to(device)
        return self

    def fingerprint(self) -> str:
        """A short digest of the UNet's weights and the schedule: what a cache of purified images is keyed by, since a
        preset name or a folder keeps its name when the weights in it are retrained."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.unet.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        h.update(self.alphas_cumprod.numpy().tobytes())
        return h.hexdigest()[:16]


def resolve_source(name_or_path: str) -> tuple[str, ModelPreset | None]:
    """Map a preset name, a local folder or a hub id to what from_pretrained takes."""
    preset = PRESETS.get(name_or_path)
    source = preset.source if preset else name_or_path
    local = MODELS_DIR / source
    if local.is_dir():
        return str(local), preset
    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser()), preset
    return source, preset


def load_model(name_or_path: str = "fmnist-tiny", device: str | torch.device = "cpu") -> DiffusionModel:
    """Load a diffusers DDPM (unet/ + scheduler/ subfolders, or a flat repo) from a folder or hub id.

    Weights are read from safetensors only: pickled checkpoints are refused by `use_safetensors=True`.
    """
    source, preset = resolve_source(name_or_path)
    is_local = Path(source).is_dir()
    sub = "unet" if (not is_local or (Path(source) / "unet").is_dir()) else None
    if is_local:
        weights = Path(source) / (sub or "")
        pickled = sorted(p.name for p in weights.glob("*") if p.suffix in PICKLE_SUFFIXES)
        if pickled and not any(weights.glob("*.safetensors")):
            raise FileNotFoundError(
                f"cannot load diffusion model {name_or_path!r}: {weights} has pickled weights only "
                f"({', '.join(pickled)}), which are refused because unpickling can run code; only safetensors "
                "weights are loaded (convert with safetensors.torch.save_file)")
    # low_cpu_mem_usage=False: the default (True) needs `accelerate`, which this project does not depend on;
    # without it diffusers falls back to False anyway, after a warning on every load that a user cannot act on.
    # These UNets are small enough to materialise on the CPU first.
    load = {"use_safetensors": True, "low_cpu_mem_usage": False}
    try:
        unet = UNet2DModel.from_pretrained(source, subfolder=sub, **load)
    except OSError as exc:
        if sub == "unet" and not is_local:
            unet = UNet2DModel.from_pretrained(source, **load)
        else:
            raise FileNotFoundError(f"cannot load diffusion model {name_or_path!r} from {source!r}: {exc}") from exc
    try:
        sched = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    except OSError:
        sched = DDPMScheduler.from_pretrained(source)
    prediction = sched.config.get("prediction_type", "epsilon")
    if prediction != "epsilon":  # every purifier reads the UNet's output as noise; anything else would be garbage
        raise ValueError(f"diffusion model {name_or_path!r} predicts {prediction!r}; the purifiers need a "
                         "noise-predicting ('epsilon') model")
    unet.eval().requires_grad_(False)
    if torch.device(device).type == "cuda":
        deterministic_cuda()
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return DiffusionModel(
        unet=unet.to(device),
        alphas_cumprod=sched.alphas_cumprod.to(torch.float64).cpu(),
        image_size=preset.image_size if preset else int(size),
        channels=int(unet.config.in_channels),
        name=name_or_path,
        black_level=preset.black_level if preset else 0.0,
        veil_share=preset.veil_share if preset else 0.0,
    )


def deterministic_cuda() -> None:
    """Purification promises the same image for the same key and seed: on CUDA that rules out cuDNN's autotuner
    (it picks convolution algorithms by timing, so two runs may differ) and TF32, which rounds float32 convolutions
    and matmuls to 10 mantissa bits. float16 / bfloat16 (`model.dtype`) are the settings for speed."""
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def build_unet(image_size: int = 28, channels: int = 1, width: int = 32) -> UNet2DModel:
    """The embedded architecture: a 3-level UNet without attention (fast on CPU, ~1.7M parameters at width 32).

    Two downsamplings keep 28x28 native (28 -> 14 -> 7); no padding to 32 is needed.
    """
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(width, 2 * width, 3 * width),
        down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
    )


def pick_device(device: str) -> str:
    """`auto` -> `cuda` when torch sees a CUDA device, else `cpu`; anything else as given."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"
