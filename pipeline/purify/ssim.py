"""Batched SSIM map in torch (Gaussian window, sigma 1.5), matching skimage's structural_similarity(full=True,
gaussian_weights=True, use_sample_covariance=False).

SSIM is Wang, Bovik, Sheikh and Simoncelli, "Image Quality Assessment: From Error Visibility to Structural
Similarity", IEEE TIP 2004 (Eq. 13, with their constants K1 = 0.01, K2 = 0.03); SampDetox reads its per-pixel map
to find where a first purification pass changed the image. Torch rather than skimage so it runs on the purifier's
device without a host round trip; tests check it against skimage."""

from __future__ import annotations

import torch

from pipeline.purify.filters import gaussian_blur

LUMA = (0.299, 0.587, 0.114)


def ssim_map(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, sigma: float = 1.5) -> torch.Tensor:
    """Per-pixel SSIM of (N, C, H, W) batches -> (N, 1, H, W); colour channels combined with luma weights."""
    c = a.shape[1]

    def blur(x: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(x, sigma)

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
