"""Locate-then-guide SDEdit (ours): a stochastic SDEdit pass whose first steps are held to the input's coarse
content, except where a quick unguided pass says that coarse content is not to be trusted.

It combines two published ideas. SDEdit (Meng et al., "SDEdit: Guided Image Synthesis and Editing with Stochastic
Differential Equations", ICLR 2022) noises the input part-way and denoises it, which washes out a trigger but also
re-imagines fine content. ZIP (Shi et al., "Black-box Backdoor Defense via Zero-shot Image Purification", NeurIPS
2023) keeps content with the range-null-space projection of DDNM (Wang et al., "Zero-Shot Image Restoration Using
Denoising Diffusion Null-Space Model", ICLR 2023), x0' = A+ y + (I - A+ A) x0, here with A a 2x2 average pool, at
every step; that also keeps whatever part of a trigger lives in A's range (a blend's offset, a sinusoid, a patch's
blob). Here the projection applies only
 - on the first `guide_steps` steps, where the coarse shape is decided (the later steps regenerate fine detail
   freely, so the low-amplitude part of a blend or a sinusoid is not copied through), and
 - on pool blocks where a cheap unguided locator pass (`locate_steps` DDIM steps from the same t) agrees with the
   input within `tau` (dilated by one block): a bright patch, which the locator removes, is never copied back.

A veiled input (a blend's haze over a black background) is unveiled first with the model's domain black level (see
base.unveil); the published methods default to none.

Opt-in restart (`restart_tau`, off by default): where the locator moved a block far (by more than `restart_core`,
and around it by more than `restart_tau`), the main pass starts from the locator's output instead of the input.
A bright patch noised to t 300 is still a pale blob that a few denoising steps can grow back; the locator has
already removed it. It is opt-in because a restarted clean image errs the same way in every pass of a vote, so the
vote cannot undo it.

Cost: locate_steps + steps NFE. The output is unsharp-masked (`sharpen` 0.5, see filters.unsharp_mask) since
few-step samples are smoother than data. How the defaults were chosen and what each part buys: docs/methods.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.purify.base import Purifier
from pipeline.purify.degradations import Pool
from pipeline.purify.models import DiffusionModel
from pipeline.purify.sampling import PurifyResult, check_eta, generators, noise_like, q_sample, reverse, state_grid


class Guided(Purifier):
    name = "guided"

    def __init__(self, model: DiffusionModel, t_start: int = 300, steps: int = 6, eta: float = 1.0,
                 locate_steps: int = 2, guide_steps: int = 2, pool: int = 2, tau: float = 0.4, sharpen: float = 0.5,
                 restart_tau: float | None = None, restart_core: float = 1.2, black_level: float | None = None,
                 spacing: str = "linear", **kw: Any) -> None:
        # None = the model's domain black level: ours uses the domain prior; the published methods default to 0.
        super().__init__(model, sharpen=sharpen, black_level=black_level, **kw)
        if not 1 <= t_start <= model.num_train_timesteps:
            raise ValueError(f"t_start must be in [1, {model.num_train_timesteps}], got {t_start}")
        state_grid(t_start, steps, spacing)
        state_grid(t_start, locate_steps, spacing)
        self.spacing = spacing
        if not 0 <= guide_steps <= steps:
            raise ValueError(f"guide_steps must be in [0, steps={steps}], got {guide_steps}")
        if pool < 1:
            raise ValueError(f"pool must be >= 1, got {pool}")
        self.op = Pool(int(pool))  # ZIP's operator: A = average pool, A+ = nearest upsampling
        self.op.check(model.channels, model.image_size)
        if not 0.0 <= tau <= 2.0:
            raise ValueError(f"tau (largest trusted block difference, in [-1, 1] units) must be in [0, 2], got {tau}")
        if restart_tau is not None and not 0.0 <= restart_tau <= 2.0:
            raise ValueError(f"restart_tau (block difference, in [-1, 1] units; null = off) must be in [0, 2], "
                             f"got {restart_tau}")
        if not 0.0 <= restart_core <= 2.0 or (restart_tau is not None and restart_core < restart_tau):
            raise ValueError(f"restart_core must be in [restart_tau, 2], got {restart_core}")
        self.restart_tau = None if restart_tau is None else float(restart_tau)
        self.restart_core = float(restart_core)
        self.t_start, self.steps, self.eta = int(t_start), int(steps), check_eta(eta)
        self.locate_steps, self.guide_steps, self.pool, self.tau = int(locate_steps), int(guide_steps), int(pool), \
            float(tau)

    def method_params(self) -> dict[str, Any]:
        # Written only when on, so the rows of runs without it keep the params they always had.
        restart = {} if self.restart_tau is None else {"restart_tau": self.restart_tau,
                                                       "restart_core": self.restart_core}
        spacing = {} if self.spacing == "linear" else {"spacing": self.spacing}
        return {"t_start": self.t_start, "steps": self.steps, "eta": self.eta, "locate_steps": self.locate_steps,
                "guide_steps": self.guide_steps, "pool": self.pool, "tau": self.tau, **restart, **spacing}

    @property
    def nominal_nfe(self) -> float:
        return float(self.locate_steps + self.steps)

    def block_diff(self, x: torch.Tensor, located: torch.Tensor) -> torch.Tensor:
        """How far the locator moved each pool block (largest over channels), at pool resolution."""
        return (self.op(x) - self.op(located)).abs().amax(1, keepdim=True)

    def trusted_blocks(self, x: torch.Tensor, located: torch.Tensor) -> torch.Tensor:
        """1 on pixels whose pool block (and its 8 neighbours) the locator left within tau of the input, else 0."""
        diff = self.block_diff(x, located)
        return self.op.pinv((F.max_pool2d(diff, 3, 1, 1) < self.tau).to(x.dtype))

    def start_point(self, x: torch.Tensor, located: torch.Tensor) -> torch.Tensor:
        """What the main pass noises: the input, except on blocks the locator moved by more than `restart_tau`
        (dilated by one block) within two blocks of one it moved by more than `restart_core`, where it is the
        locator's output. The core is a hysteresis (as in Canny's edge detector): fine texture of clean images often
        moves a block past `restart_tau` but seldom past the core, while a removed patch moves its blocks past both
        (measured in docs/methods.md, Restart)."""
        if self.restart_tau is None:
            return x
        diff = self.block_diff(x, located)
        near_core = F.max_pool2d((diff > self.restart_core).to(x.dtype), 5, 1, 2) > 0
        restart = self.op.pinv(((F.max_pool2d(diff, 3, 1, 1) > self.restart_tau) & near_core).to(x.dtype))
        return (1 - restart) * x + restart * located

    def _purify(self, x: torch.Tensor, keys: Sequence[str], seed: int) -> PurifyResult:
        gens = generators(keys, seed)
        located = reverse(self.model, q_sample(self.model, x, self.t_start, noise_like(x, gens)), self.t_start,
                          self.locate_steps, gens, self.eta, dtype=self.dtype, spacing=self.spacing)
        mask = self.trusted_blocks(x, located)
        back = self.op.pinv(self.op(x))
        start = self.start_point(x, located)

        def project(x0: torch.Tensor) -> torch.Tensor:
            return x0 + mask * (back - self.op.pinv(self.op(x0)))

        x_t = q_sample(self.model, start, self.t_start, noise_like(x, gens))
        out = reverse(self.model, x_t, self.t_start, self.steps, gens, self.eta, project=project,
                      project_steps=self.guide_steps, dtype=self.dtype, spacing=self.spacing)
        nfe = torch.full((x.shape[0],), self.locate_steps + self.steps, dtype=torch.long)
        return PurifyResult(out, nfe)
