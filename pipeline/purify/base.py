"""What every purifier shares: input checks, the size policy, unveiling, output sharpening, the call signature.

A purifier is a Ray-free, batched torch callable: images (uint8 or [0, 1] floats, (N, C, H, W)) and their keys in,
purified images in [-1, 1] and the exact UNet evaluations (NFE) spent on each image out. Noise is drawn per image
from a generator seeded by (key, seed), so a result does not depend on the batch or the worker it ran in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.purify.filters import check_sigma, unsharp_mask
from pipeline.purify.models import DiffusionModel
from pipeline.purify.sampling import PurifyResult

SIZE_POLICIES = ("error", "resize", "pad")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def as_model_input(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) batch (N, C, H, W) -> float32 in [-1, 1] on `device`."""
    x = torch.as_tensor(images) if not isinstance(images, torch.Tensor) else images
    if x.ndim != 4:
        raise ValueError(f"expected a batch (N, C, H, W), got shape {tuple(x.shape)}")
    if 0 in x.shape[1:]:
        raise ValueError(f"images need at least one channel and pixel, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.to(device=device, dtype=torch.float32) / 127.5 - 1.0
    if not x.is_floating_point():
        raise TypeError(f"images must be uint8 or float, got {x.dtype}")
    x = x.to(device=device, dtype=torch.float32)
    if x.numel() and not torch.isfinite(x).all():  # a NaN passes both range comparisons and would come out black
        raise ValueError("float images must be finite (got NaN or inf)")
    if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise ValueError("float images must be scaled to [0, 1] (got values outside)")
    return x * 2 - 1


def unveil(x: torch.Tensor, black_level: float, share: float = 0.0) -> torch.Tensor:
    """Clear a dark veil: on images where at least `share` of the values sit in the haze band (0, black_level)
    (black_level in [0, 1] image units; x in [-1, 1]), set every value below `black_level` to black, per channel.

    Why: a low-frequency offset survives the forward noise (white noise hides texture, not a level), so a blend
    trigger's veil over a black background (Blended: every pixel 0.8 x + 0.2 key, the background a 0..51 haze) reads
    to the UNet as faint content and gets re-imagined as an object. The dead zone is a cousin of feature squeezing's
    bit-depth reduction (Xu, Evans and Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep Neural
    Networks", NDSS 2018); gating it on the haze share leaves the dark detail of clean images alone, since a clean
    image on a black background has few pixels in the band and a veiled one has many. Measurements:
    docs/methods.md, Unveiling."""
    if black_level <= 0:
        return x
    below = x < 2 * black_level - 1
    veiled = (below & (x > -1)).flatten(1).float().mean(1) >= share
    return torch.where(below & veiled.view(-1, *([1] * (x.ndim - 1))), torch.full_like(x, -1.0), x)


class Purifier(ABC):
    """A batched, Ray-free purification method. Call it with images and their keys; get images back and NFE."""

    name: str = "base"

    def __init__(self, model: DiffusionModel, size_policy: str = "resize", dtype: str = "float32",
                 sharpen: float = 0.0, sharpen_sigma: float = 1.0, black_level: float | None = 0.0,
                 veil_share: float | None = None) -> None:
        if not 0.0 <= sharpen <= 3.0:
            raise ValueError(f"sharpen (unsharp-mask amount) must be in [0, 3], got {sharpen}")
        if not 0.3 <= sharpen_sigma <= 3.0:
            raise ValueError(f"sharpen_sigma must be in [0.3, 3], got {sharpen_sigma}")
        check_sigma("sharpen_sigma", sharpen_sigma, model.image_size)
        # None = the model's domain prior (its preset's); black_level 0 turns unveiling off.
        black_level = model.black_level if black_level is None else black_level
        veil_share = model.veil_share if veil_share is None else veil_share
        if not 0.0 <= black_level < 1.0:
            raise ValueError(f"black_level (in [0, 1) image units; 0 = off) must be in [0, 1), got {black_level}")
        if not 0.0 <= veil_share <= 1.0:
            raise ValueError(f"veil_share (share of pixels in the haze band) must be in [0, 1], got {veil_share}")
        if size_policy not in SIZE_POLICIES:
            raise ValueError(f"size_policy must be one of {SIZE_POLICIES}, got {size_policy!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        self.model = model
        self.size_policy = size_policy
        self.dtype = DTYPES[dtype]
        self.sharpen, self.sharpen_sigma = float(sharpen), float(sharpen_sigma)
        self.black_level, self.veil_share = float(black_level), float(veil_share)

    @abstractmethod
    def method_params(self) -> dict[str, Any]:
        """The method's own knobs."""

    def params(self) -> dict[str, Any]:
        """The knobs that define this run (written next to every output row)."""
        extra = {"sharpen": self.sharpen, "sharpen_sigma": self.sharpen_sigma} if self.sharpen else {}
        if self.black_level:
            extra.update(black_level=self.black_level, veil_share=self.veil_share)
        return {**self.method_params(), **extra}

    @property
    @abstractmethod
    def nominal_nfe(self) -> float:
        """UNet evaluations per image for this setting (an upper bound where the method adapts)."""

    @abstractmethod
    def _purify(self, x: torch.Tensor, keys: Sequence[str], seed: int) -> PurifyResult:
        """x: float (N, C, S, S) in [-1, 1] at the model's size S."""

    def __call__(self, images: np.ndarray | torch.Tensor, keys: Sequence[str], seed: int = 0) -> PurifyResult:
        x = as_model_input(images, self.model.device)
        n, c, h, w = x.shape
        if len(keys) != n:
            raise ValueError(f"got {n} images but {len(keys)} keys")
        if c != self.model.channels:
            raise ValueError(f"model {self.model.name!r} takes {self.model.channels} channel(s), images have {c}")
        if n == 0:
            return PurifyResult(x, torch.zeros(0, dtype=torch.long))
        x = unveil(x, self.black_level, self.veil_share)
        s = self.model.image_size
        x_in, undo = self._fit(x, s)
        res = self._purify(x_in, keys, seed)
        # At the model's size, before undoing the fit: the blur being undone is the sampler's, at its resolution.
        out = unsharp_mask(res.images, self.sharpen, self.sharpen_sigma)
        return PurifyResult(undo(out).clamp(-1, 1), res.nfe.cpu())

    def _fit(self, x: torch.Tensor, s: int):
        h, w = x.shape[-2:]
        if (h, w) == (s, s):
            return x, lambda y: y
        if self.size_policy == "error":
            raise ValueError(f"images are {h}x{w}, model {self.model.name!r} takes {s}x{s} (size_policy='error')")
        if self.size_policy == "resize":
            fit = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
            return fit, lambda y: F.interpolate(y, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        if h > s or w > s:
            raise ValueError(f"size_policy='pad' cannot fit {h}x{w} into {s}x{s}")
        top, left = (s - h) // 2, (s - w) // 2
        # Edge padding keeps border statistics natural for the UNet; constant -1 would look like a frame.
        fit = F.pad(x, (left, s - w - left, top, s - h - top), mode="replicate")
        return fit, lambda y: y[..., top: top + h, left: left + w]
