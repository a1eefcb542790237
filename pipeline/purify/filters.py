"""Small image filters on (N, C, H, W) torch batches, shared by the SSIM map and the output sharpening."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.purify.batching import rowwise

TRUNCATE = 3.5  # skimage's: an 11-tap window at sigma 1.5


def window_radius(sigma: float, truncate: float = TRUNCATE) -> int:
    return int(truncate * sigma + 0.5)


def check_sigma(name: str, sigma: float, size: int, least: float = 0.3) -> float:
    """A Gaussian filter's sigma for images of `size` pixels: at least `least` (below it the window is a delta), and
    a window whose symmetric border fits in the image."""
    sigma = float(sigma)
    if not sigma >= least:  # NaN too
        raise ValueError(f"{name} must be at least {least}, got {sigma}")
    if window_radius(sigma) > size:
        raise ValueError(f"{name} {sigma:g} needs a {2 * window_radius(sigma) + 1}-pixel window, wider than twice "
                         f"the {size}-pixel image allows: use at most {(size - 0.5) / TRUNCATE:.2f}")
    return sigma


def gaussian_window(sigma: float, device: torch.device, truncate: float = TRUNCATE) -> torch.Tensor:
    r = window_radius(sigma, truncate)
    g = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float32, device=device) ** 2) / (2 * sigma**2))
    return g / g.sum()


def symmetric_pad(x: torch.Tensor, r: int) -> torch.Tensor:
    # scipy's 'reflect' (d c b a | a b c d), which skimage uses; torch's "reflect" mode skips the edge pixel.
    x = torch.cat([x[..., :r].flip(-1), x, x[..., -r:].flip(-1)], -1)
    return torch.cat([x[..., :r, :].flip(-2), x, x[..., -r:, :].flip(-2)], -2)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur per channel with symmetric borders (scipy.ndimage.gaussian_filter's convention)."""
    g = gaussian_window(sigma, x.device)
    r = g.numel() // 2
    c = x.shape[1]

    def blur(x: torch.Tensor) -> torch.Tensor:
        y = symmetric_pad(x.float(), r)
        y = F.conv2d(y, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(y, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)

    return rowwise(blur, x)  # fixed-size CPU calls: a row's blur must not depend on its batch (batching.py)


def unsharp_mask(x: torch.Tensor, amount: float, sigma: float = 1.0) -> torch.Tensor:
    """x + amount * (x - blur(x)), clamped to [-1, 1].

    Why a purifier wants it: few-step diffusion outputs are smoother than real data (the last step returns a
    posterior mean), and a victim can read smoothness as a trigger (WaNet's trigger is a small warp applied by
    bilinear resampling, which itself smooths). Restoring the lost high frequencies costs no UNet evaluation; its
    effect on the benchmark is in docs/methods.md, Sharpening."""
    if amount == 0:
        return x
    return (x + amount * (x - gaussian_blur(x, sigma))).clamp(-1, 1).to(x.dtype)
