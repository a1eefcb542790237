"""Linear degradations A with pseudo-inverses A+ for ZIP: pool, blur, gray, and their compositions.

These are the operators of DDNM's range-null-space projection (Wang et al., ICLR 2023) as ZIP (Shi et al.,
NeurIPS 2023) uses them: A should destroy a trigger's structure while keeping enough of the image to restore it.

Each operator maps (N, C, H, W) -> its measurement space; `pinv` maps back. For pool and gray A A+ = I exactly, so a
DDNM projection x0 + A+(y - A x0) makes A(x_hat) = y exactly; blur uses a Tikhonov-regularised inverse and so is
consistent only up to the regulariser.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

MIN_BLUR_SIGMA, MAX_BLUR_SIGMA = 0.3, 16.0


class Degradation:
    name = "identity"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def check(self, channels: int, size: int) -> int:
        """Raise a clear error when the operator cannot act on images of this shape; return the measurement's size
        (what the next operator of a composition acts on)."""
        return size

    def is_identity(self, channels: int) -> bool:
        """A = I on images of this many channels: the range-space step would copy the whole input back."""
        return False


@dataclass
class Pool(Degradation):
    """Average-pool down by k; A+ is nearest upsampling (ZIP's public 'blur')."""

    k: int = 2

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"pool{self.k}: the pooling factor must be at least 1")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"pool{self.k}"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.k)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return F.interpolate(y, scale_factor=self.k, mode="nearest")

    def check(self, channels: int, size: int) -> int:
        if size % self.k:
            raise ValueError(f"pool{self.k} needs an image size divisible by {self.k}, got {size}")
        return size // self.k

    def is_identity(self, channels: int) -> bool:
        return self.k == 1


@dataclass
class Blur(Degradation):
    """Gaussian blur as a circular convolution; A+ = H* / (|H|^2 + lam) in the Fourier domain."""

    sigma: float = 2.0
    lam: float = 1e-3
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not MIN_BLUR_SIGMA <= self.sigma <= MAX_BLUR_SIGMA:
            # below: the kernel is (nearly) a delta, A = I and ZIP would copy the input back (0: NaN images)
            raise ValueError(f"blur{self.sigma:g}: sigma must be in [{MIN_BLUR_SIGMA}, {MAX_BLUR_SIGMA}]")

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"blur{self.sigma:g}"

    def _otf(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        key = (h, w, device)
        if key not in self._cache:
            r = max(1, math.ceil(3 * self.sigma))
            g = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float64) ** 2) / (2 * self.sigma**2))
            g = g / g.sum()
            k2 = torch.outer(g, g)
            psf = torch.zeros(h, w, dtype=torch.float64)
            for i in range(-r, r + 1):
                for j in range(-r, r + 1):
                    psf[i % h, j % w] += k2[i + r, j + r]
            self._cache[key] = torch.fft.fft2(psf).to(device=device, dtype=torch.complex64)
        return self._cache[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        otf = self._otf(*x.shape[-2:], x.device)
        return torch.fft.ifft2(torch.fft.fft2(x.float()) * otf).real.to(x.dtype)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        otf = self._otf(*y.shape[-2:], y.device)
        inv = otf.conj() / (otf.abs() ** 2 + self.lam)
        return torch.fft.ifft2(torch.fft.fft2(y.float()) * inv).real.to(y.dtype)


@dataclass
class Gray(Degradation):
    """Channel mean; A+ replicates. On one-channel images it is the identity."""

    name = "gray"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1, keepdim=True)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return y  # broadcasts against (N, C, H, W) in the projection; expanded explicitly below when needed

    def is_identity(self, channels: int) -> bool:
        return channels == 1


@dataclass
class Compose(Degradation):
    """A = A_n ... A_1 (applied in list order); A+ = A_1+ ... A_n+."""

    ops: list[Degradation] = field(default_factory=list)

    @property
    def name(self) -> str:  # type: ignore[override]
        return "+".join(op.name for op in self.ops)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.ops:
            x = op(x)
        return x

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        for op in reversed(self.ops):
            y = op.pinv(y)
        return y

    def check(self, channels: int, size: int) -> int:
        for op in self.ops:  # each acts on the previous one's measurement: pool2+pool4 needs 8 | size
            size = op.check(channels, size)
        return size

    def is_identity(self, channels: int) -> bool:
        return all(op.is_identity(channels) for op in self.ops)


def parse_degradation(spec: str) -> Degradation:
    """'pool2', 'pool4', 'blur2', 'blur1.5', 'gray', or a '+'-joined composition like 'gray+pool2'."""
    ops: list[Degradation] = []
    for part in spec.lower().split("+"):
        part = part.strip()
        if m := re.fullmatch(r"pool(\d+)", part):
            ops.append(Pool(int(m.group(1))))
        elif m := re.fullmatch(r"blur(\d+(?:\.\d+)?)", part):
            ops.append(Blur(float(m.group(1))))
        elif part == "gray":
            ops.append(Gray())
        else:
            raise ValueError(f"unknown degradation {part!r}: use poolK, blurSIGMA, gray, joined by '+'")
    return ops[0] if len(ops) == 1 else Compose(ops)
