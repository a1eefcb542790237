"""The shared few-step reverse loop: per-image seeded noise, a DDIM/DDPM step, an optional DDNM projection hook.

The forward process is DDPM's (Ho, Jain and Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020), the
reverse step DDIM's (Song, Meng and Ermon, "Denoising Diffusion Implicit Models", ICLR 2021), which takes strided
steps on the same trained model and, with eta = 1 between consecutive states, is DDPM's ancestral step wherever the
predicted x0 lies in [-1, 1] (see `ddim_step` for where it is clamped).

State convention: state t in 0..T counts forward noising steps, so x_t = sqrt(abar(t)) x_0 + sqrt(1 - abar(t)) eps
(DDPM Eq. 4) with abar(0) = 1 and abar(t) = alphas_cumprod[t - 1]; the UNet is called with timestep t - 1. Then
"t_start = 250, steps = 10" costs exactly 10 UNet evaluations (NFE) and ends on a clean state. A step is written here
rather than taken from a diffusers scheduler because ZIP must edit the x0 prediction inside the step and SampDetox
needs a different noise level per pixel; neither fits `scheduler.step`. tests/test_purify.py checks that the step
equals diffusers' `DDIMScheduler.step` (and, at eta 1 on consecutive states, `DDPMScheduler.step`) on the same inputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from pipeline.purify.batching import rowwise
from pipeline.purify.models import DiffusionModel

Projection = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PurifyResult:
    images: torch.Tensor  # float (N, C, H, W) in [-1, 1], on the input's device
    nfe: torch.Tensor  # int64 (N,): UNet evaluations spent on each image

    def uint8(self) -> np.ndarray:
        return to_uint8(self.images)


def key_seed(key: str, seed: int) -> int:
    """A 63-bit seed from (image key, job seed): stable across processes, unlike hash()."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def generators(keys: Sequence[str], seed: int) -> list[torch.Generator]:
    # CPU generators: the same stream on every device, so a result does not depend on where it ran.
    return [torch.Generator("cpu").manual_seed(key_seed(str(k), seed)) for k in keys]


def noise_like(x: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """One noise draw per image from its own generator: independent of batch composition."""
    return randn_tensor(tuple(x.shape), generator=gens, device=x.device, dtype=torch.float32).to(x.dtype)


def abar(model: DiffusionModel, t: int | torch.Tensor) -> torch.Tensor:
    """alpha_bar at state t (0 = clean). Works on ints or integer tensors (per-pixel levels)."""
    table = torch.cat([torch.ones(1, dtype=torch.float64), model.alphas_cumprod])
    if isinstance(t, int):
        return table[t].float()
    return table.to(t.device)[t].float()


def check_eta(eta: float) -> float:
    """DDIM's eta: 0 deterministic, 1 DDPM's posterior variance; past 1 the variance would exceed 1 - a_prev."""
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:  # NaN too
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    return eta


SPACINGS = ("linear", "quadratic")


def state_grid(t_start: int, steps: int, spacing: str = "linear") -> list[int]:
    """Descending states t_start = g0 > g1 > ... > g_steps = 0, `steps` transitions.

    `spacing` is DDIM's choice of sub-sequence (Song et al. 2021, Sec. 4.2 and App. D.2): "linear", evenly spaced;
    "quadratic", g_k = t_start ((steps - k) / steps)^2, whose steps shrink towards the clean end, where fine detail
    is decided (each state kept at least one above the next)."""
    if not 1 <= steps <= t_start:
        raise ValueError(f"steps must be in [1, t_start={t_start}], got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if spacing == "linear":
        return np.linspace(t_start, 0, steps + 1).round().astype(int).tolist()
    grid = [round(t_start * ((steps - k) / steps) ** 2) for k in range(steps + 1)]
    for k in range(steps - 1, -1, -1):  # with steps <= t_start this never lifts g0 above t_start
        grid[k] = max(grid[k], grid[k + 1] + 1)
    return grid


def q_sample(model: DiffusionModel, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Noise x0 to state t in one draw, q(x_t | x_0) (DDPM Eq. 4); t may be a per-pixel integer tensor."""
    a = abar(model, t)
    if a.ndim:
        a = a.to(x0.device)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise



def predict_eps(model: DiffusionModel, x: torch.Tensor, t: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The UNet's noise prediction eps_theta(x_t, t) (one NFE per image), optionally under autocast to `dtype`."""
    def unet(x: torch.Tensor) -> torch.Tensor:
        ts = torch.full((x.shape[0],), t - 1, device=x.device, dtype=torch.long)
        if dtype != torch.float32:
            with torch.autocast(device_type=x.device.type, dtype=dtype):
                return model.unet(x, ts).sample.float()
        return model.unet(x, ts).sample

    # in fixed-size CPU calls: a row's prediction must not depend on the rows it is computed with (batching.py)
    return rowwise(unet, x)


def ddim_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    a_t: torch.Tensor,
    a_prev: torch.Tensor,
    eta: float,
    noise: torch.Tensor | None,
    project: Projection | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One generalized DDIM step from state t to t_prev (DDIM Eq. 12, as diffusers' `DDIMScheduler.step`):

        x0_pred = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)                         "predicted x0", clamped to [-1, 1]
        sigma   = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)     Eq. 16
        x_prev  = sqrt(a_prev) x0_pred + sqrt(1 - a_prev - sigma^2) eps + sigma z

    a_t, a_prev are alpha_bar at the two states, z is `noise`. eta = 0 is deterministic DDIM; eta = 1 on
    consecutive states is DDPM's ancestral step (posterior of DDPM Eq. 6-7, variance beta-tilde) wherever x0_pred
    needs no clamp. Where it is clamped, the direction term keeps the model's eps, as `DDIMScheduler` does with
    `clip_sample` (and `use_clipped_model_output` off): neither DDPM's clipped posterior (clamped x0 with x_t) nor
    unclipped DDPM. `project`, if
    given, replaces x0_pred (DDNM's range-null-space step, used by ZIP and guided) and eps is re-derived from the
    projected x0 so the direction term stays consistent with it. Returns (x_prev, x0_pred)."""
    x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
    if project is not None:
        x0 = project(x0)
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()  # the noise consistent with the projected x0 (DDNM)
    sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
    # clamp: rounding can make 1 - a_prev - sigma^2 a hair negative at eta 1 onto the clean state
    x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0 and noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, x0


@torch.no_grad()
def reverse(
    model: DiffusionModel,
    x_t: torch.Tensor,
    t_start: int,
    steps: int,
    gens: list[torch.Generator],
    eta: float = 0.0,
    project: Projection | None = None,
    dtype: torch.dtype = torch.float32,
    project_steps: int | None = None,
    spacing: str = "linear",
) -> torch.Tensor:
    """Run the reverse process from state t_start to 0 in `steps` UNet evaluations on `state_grid`'s states;
    `project` (if any) applies to the first `project_steps` steps (all by default)."""
    grid = state_grid(t_start, steps, spacing)
    x = x_t
    for i, (t, t_prev) in enumerate(zip(grid[:-1], grid[1:])):
        eps = predict_eps(model, x, t, dtype)
        noise = noise_like(x, gens) if eta > 0 else None
        hook = project if project_steps is None or i < project_steps else None
        x, _ = ddim_step(x, eps, abar(model, t), abar(model, t_prev), eta, noise, hook)
    return x.clamp(-1, 1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
