"""SampDetox (Yang et al., "SampDetox: Black-box Backdoor Defense via Perturbation-based Sample Detoxification",
NeurIPS 2024): a weak global noise-and-denoise pass, then strong *local* noise where the SSIM map (Wang et al., IEEE
TIP 2004; see ssim.py) says the first pass changed the image, denoised again with each pixel joining the reverse
process at its own level floor((1 - S_hat) t2), S_hat the map rescaled per image to [0, 1] by its own minimum
and maximum (as the public code does), so that the most-changed pixel of every image joins at t2.

Defaults are the paper's (t1 = 20, t2 = 120, full DDPM steps, on the model's own schedule). Departures from the
public code, on purpose: noise is drawn per image (seeded by key), stage 2 is vectorised with masks (no per-pixel
loop), SSIM uses the data range of the [-1, 1] inputs (a flat map, where the first pass changed nothing anywhere,
asks for no strong noise instead of dividing by zero), `steps1` / `steps2` allow DDIM-style striding, and each step
is the shared DDIM step at eta 1 (variance beta-tilde, the x0 prediction clamped to [-1, 1] at every step; the public
code runs unclipped DDPM steps with variance beta and clips only the final image). Images
whose map asks for no strong noise skip the UNet in stage 2, so NFE is counted per image.

`LocalRepair` ("repair") is our variant for high-visibility triggers, which the paper's weak first pass never
changes and so never locates: a *strong* first pass only to locate (whatever it removed, a bright patch included,
shows in the SSIM map), then stage 2 starts from the *input* (`start="input"`), so pixels the map leaves alone
come back unchanged and the image keeps its meaning, and pixels that have not joined yet are re-noised to the
loop's current level each step (`pin="renoise"`, as in differential diffusion: Levin and Fried, "Differential
Diffusion: Giving Each Pixel Its Strength", 2023), so the UNet always sees one consistent noise level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.purify.base import Purifier
from pipeline.purify.filters import check_sigma
from pipeline.purify.models import DiffusionModel
from pipeline.purify.sampling import (
    PurifyResult,
    abar,
    check_eta,
    ddim_step,
    generators,
    noise_like,
    predict_eps,
    q_sample,
    reverse,
    state_grid,
)
from pipeline.purify.ssim import ssim_map

STARTS = ("detoxed", "input")
PINS = ("wait", "renoise")
# How the SSIM map becomes S_hat in [0, 1]: rescaled per image by its own min and max (the paper's code), or only
# clipped, so that an image the first pass barely changed gets little strong noise anywhere (ours, for `repair`).
SSIM_NORMS = ("minmax", "clip")


class SampDetox(Purifier):
    name = "sampdetox"

    def __init__(self, model: DiffusionModel, t1: int = 20, t2: int = 120, steps1: int | None = None,
                 steps2: int | None = None, eta: float = 1.0, ssim_sigma: float = 1.5, start: str = "detoxed",
                 pin: str = "wait", ssim_norm: str = "minmax", **kw: Any) -> None:
        super().__init__(model, **kw)
        T = model.num_train_timesteps
        if not (1 <= t1 <= T and 1 <= t2 <= T):
            raise ValueError(f"t1 and t2 must be in [1, {T}], got {t1}, {t2}")
        if start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {start!r}")
        if pin not in PINS:
            raise ValueError(f"pin must be one of {PINS}, got {pin!r}")
        if ssim_norm not in SSIM_NORMS:
            raise ValueError(f"ssim_norm must be one of {SSIM_NORMS}, got {ssim_norm!r}")
        self.ssim_norm = ssim_norm
        self.t1, self.t2 = int(t1), int(t2)
        self.steps1 = self.t1 if steps1 is None else int(steps1)  # None: full DDPM (0 is refused, not read as None)
        self.steps2 = self.t2 if steps2 is None else int(steps2)
        state_grid(self.t1, self.steps1)
        state_grid(self.t2, self.steps2)
        self.eta = check_eta(eta)
        self.ssim_sigma = check_sigma("ssim_sigma", ssim_sigma, model.image_size)
        self.start, self.pin = start, pin

    def method_params(self) -> dict[str, Any]:
        return {"t1": self.t1, "t2": self.t2, "steps1": self.steps1, "steps2": self.steps2, "eta": self.eta,
                "start": self.start, "pin": self.pin, "ssim_norm": self.ssim_norm}

    @property
    def nominal_nfe(self) -> float:
        return float(self.steps1 + self.steps2)

    def noise_levels(self, x: torch.Tensor, x_bar: torch.Tensor) -> torch.Tensor:
        """Per-pixel target state floor((1 - S_hat) * t2), S_hat = the SSIM map normalised to [0, 1] per image
        (`ssim_norm`): (N, 1, H, W) int64."""
        s = ssim_map(x, x_bar, data_range=2.0, sigma=self.ssim_sigma)
        if self.ssim_norm == "minmax":
            lo = s.amin(dim=(1, 2, 3), keepdim=True)
            span = s.amax(dim=(1, 2, 3), keepdim=True) - lo
            s = torch.where(span > 1e-6, (s - lo) / span.clamp_min(1e-6), torch.ones_like(s))
        return torch.floor((1 - s.clamp(0, 1)) * self.t2).long()

    @torch.no_grad()
    def _purify(self, x: torch.Tensor, keys: Sequence[str], seed: int) -> PurifyResult:
        gens = generators(keys, seed)
        n = x.shape[0]
        x_bar = reverse(self.model, q_sample(self.model, x, self.t1, noise_like(x, gens)), self.t1, self.steps1,
                        gens, self.eta, dtype=self.dtype)
        nfe = torch.full((n,), self.steps1, dtype=torch.long)

        grid = state_grid(self.t2, self.steps2)
        ascending = torch.tensor(grid[::-1], device=x.device)
        levels = self.noise_levels(x, x_bar)
        # Snap each pixel's level onto the step grid so it joins the loop exactly at one of its states: down in
        # the paper's mode; up when repairing from the input, where too little noise would hand the trigger back.
        if self.pin == "renoise":
            q = ascending[torch.searchsorted(ascending, levels, right=False)]
        else:
            q = ascending[torch.searchsorted(ascending, levels, right=True) - 1]
        base = x_bar if self.start == "detoxed" else x
        eps0 = noise_like(x, gens)
        cur = q_sample(self.model, base, q, eps0)
        for t, t_prev in zip(grid[:-1], grid[1:]):
            noise = noise_like(x, gens) if self.eta > 0 else None  # drawn for every image: keeps streams aligned
            active = q >= t
            rows = active.flatten(1).any(1).nonzero().flatten()
            if rows.numel() == 0:
                continue
            xs = cur[rows]
            if self.pin == "renoise":
                xs = torch.where(active[rows], xs, q_sample(self.model, base[rows], t, eps0[rows]))
            eps = predict_eps(self.model, xs, t, self.dtype)
            step, _ = ddim_step(xs, eps, abar(self.model, t), abar(self.model, t_prev), self.eta,
                                None if noise is None else noise[rows])
            cur[rows] = torch.where(active[rows], step, cur[rows])
            nfe[rows.cpu()] += 1
        return PurifyResult(cur.clamp(-1, 1), nfe)


class LocalRepair(SampDetox):
    """Strong global pass to locate, local repair from the input (see the module docstring). 14 NFE by default.

    t2 defaults to 500 rather than 400: the deeper local noise removes more of a patch for a few points of clean
    accuracy, which a vote over several passes wins back (numbers: docs/methods.md, Repair)."""

    name = "repair"

    def __init__(self, model: DiffusionModel, t1: int = 400, t2: int = 500, steps1: int | None = 6,
                 steps2: int | None = 8, eta: float = 0.0, ssim_sigma: float = 1.5, start: str = "input",
                 pin: str = "renoise", ssim_norm: str = "clip", **kw: Any) -> None:
        super().__init__(model, t1=t1, t2=t2, steps1=steps1, steps2=steps2, eta=eta, ssim_sigma=ssim_sigma,
                         start=start, pin=pin, ssim_norm=ssim_norm, **kw)
