"""Batched SSIM map in torch (Gaussian window, sigma 1.5), matching skimage's structural_similarity(full=True,
gaussian_weights=True, use_sample_covariance=False). Torch rather than skimage so it runs on the purifier's device
without a host round trip; tests check it against skimage."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)


def _window(sigma: float, device: torch.device) -> torch.Tensor:
    r = int(3.5 * sigma + 0.5)  # skimage's truncate=3.5 gives an 11-tap window at sigma 1.5
    g = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float32, device=device) ** 2) / (2 * sigma**2))
    return g / g.sum()


def _symmetric_pad(x: torch.Tensor, r: int) -> torch.Tensor:
    # scipy's 'reflect' (d c b a | a b c d), which skimage uses; torch's "reflect" mode skips the edge pixel.
    x = torch.cat([x[..., :r].flip(-1), x, x[..., -r:].flip(-1)], -1)
    return torch.cat([x[..., :r, :].flip(-2), x, x[..., -r:, :].flip(-2)], -2)


def ssim_map(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, sigma: float = 1.5) -> torch.Tensor:
    """Per-pixel SSIM of (N, C, H, W) batches -> (N, 1, H, W); colour channels combined with luma weights."""
    n, c, h, w = a.shape
    g = _window(sigma, a.device)
    r = g.numel() // 2

    def blur(x: torch.Tensor) -> torch.Tensor:
        x = _symmetric_pad(x, r)
        x = F.conv2d(x, g.view(1, 1, 1, -1).expand(x.shape[1], 1, 1, -1), groups=x.shape[1])
        return F.conv2d(x, g.view(1, 1, -1, 1).expand(x.shape[1], 1, -1, 1), groups=x.shape[1])

    a, b = a.float(), b.float()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    if c == 3:
        wts = torch.tensor(LUMA, device=a.device).view(1, 3, 1, 1)
        return (s * wts).sum(1, keepdim=True)
    return s.mean(1, keepdim=True)
