"""Locate-then-guide SDEdit (ours): a stochastic SDEdit pass whose first steps are held to the input's coarse
content, except where a quick unguided pass says the input's coarse content is not to be trusted.

Why: one SDEdit pass at t 300 removes every trigger of the kit but costs 7-10 points of clean accuracy
(the model re-imagines collars and sleeves); ZIP keeps content by replacing the range space of a degradation (an
average pool) with the input's at every step, but so keeps any trigger that lives there (a blend's offset, a
sinusoid, a patch's blob). Here the projection x0' = A+ y + (I - A+ A) x0 (DDNM, as in ZIP) applies only
 - on the first `guide_steps` steps, where the coarse shape is decided (later steps regenerate fine detail freely,
   so the low-amplitude part of a blend or a sinusoid is not copied through), and
 - on pool blocks where a cheap unguided locator pass (`locate_steps` DDIM steps from the same t) agrees with the
   input within `tau` (dilated by one block): a bright patch, which the locator removes, is never copied back.
A veiled input (a blend's haze over a black background) is unveiled first with the model's domain black level (see
base.unveil); the published methods default to none.
Opt-in (`restart_tau`, off by default): where the locator moved a block far (by more than `restart_core`, and
around it by more than `restart_tau`), the main pass starts from the locator's output instead of from the input.
Why: a bright patch noised to t 300 is still a pale blob, and a few denoising steps grow it back often enough that
the BadNets victim fires; the locator has already removed it. One pass on test images 0-999 (restart_tau 0.8):
BadNets ASR .056 -> .032, CA .838 -> .836, Blended and WaNet PA unchanged (.831 vs .833, .815 vs .815); restarting
every block moved by > 0.8 (no core) did as well on BadNets but cost Blended and WaNet a point of PA, since half of
all clean images have such a block (fine texture). In the 5-pass vote a restarted clean image errs the same way in
every pass, so the vote cannot undo it: CA -0.1..-0.4 on 1,000 bench images, but up to -1.0 on the 300 of the
default bench, where it costs WaNet's PA bar. So it is opt-in: the setting for patch triggers (on 1,000 images the
vote's BadNets ASR .039 -> .029).
Cost: locate_steps + steps NFE (8 by default). Defaults: the bench's best at that cost on the embedded model; the
output is unsharp-masked (`sharpen` 0.5, see filters.unsharp_mask) since few-step samples are smoother than data.
Measured on 500 Fashion-MNIST test images (one pass, against SDEdit t 300 / 8 steps / eta 1, sharpened, in
brackets): CA .844-.854 (.812-.826) on the four victims, PA on blended .742 (.719), on WaNet .820 (.766).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.purify.base import Purifier
from pipeline.purify.degradations import Pool
from pipeline.purify.models import DiffusionModel
from pipeline.purify.sampling import PurifyResult, generators, noise_like, q_sample, reverse, state_grid


class Guided(Purifier):
    name = "guided"

    def __init__(self, model: DiffusionModel, t_start: int = 300, steps: int = 6, eta: float = 1.0,
                 locate_steps: int = 2, guide_steps: int = 2, pool: int = 2, tau: float = 0.4, sharpen: float = 0.5,
                 restart_tau: float | None = None, restart_core: float = 1.2, black_level: float | None = None,
                 **kw: Any) -> None:
        # None = the model's domain black level: ours uses the domain prior; the published methods default to 0.
        super().__init__(model, sharpen=sharpen, black_level=black_level, **kw)
        if not 1 <= t_start <= model.num_train_timesteps:
            raise ValueError(f"t_start must be in [1, {model.num_train_timesteps}], got {t_start}")
        state_grid(t_start, steps)
        state_grid(t_start, locate_steps)
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
        self.t_start, self.steps, self.eta = int(t_start), int(steps), float(eta)
        self.locate_steps, self.guide_steps, self.pool, self.tau = int(locate_steps), int(guide_steps), int(pool), \
            float(tau)

    def method_params(self) -> dict[str, Any]:
        # Written only when on, so the rows of runs without it keep the params they always had.
        restart = {} if self.restart_tau is None else {"restart_tau": self.restart_tau,
                                                       "restart_core": self.restart_core}
        return {"t_start": self.t_start, "steps": self.steps, "eta": self.eta, "locate_steps": self.locate_steps,
                "guide_steps": self.guide_steps, "pool": self.pool, "tau": self.tau, **restart}

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
        locator's output. The core is a hysteresis (as in Canny's edges): half of all clean images have a block
        moved by > 0.8 (fine texture), one in ten by > 1.2, while a removed patch moves its blocks by 1.5-2."""
        if self.restart_tau is None:
            return x
        diff = self.block_diff(x, located)
        near_core = F.max_pool2d((diff > self.restart_core).to(x.dtype), 5, 1, 2) > 0
        restart = self.op.pinv(((F.max_pool2d(diff, 3, 1, 1) > self.restart_tau) & near_core).to(x.dtype))
        return (1 - restart) * x + restart * located

    def _purify(self, x: torch.Tensor, keys: Sequence[str], seed: int) -> PurifyResult:
        gens = generators(keys, seed)
        located = reverse(self.model, q_sample(self.model, x, self.t_start, noise_like(x, gens)), self.t_start,
                          self.locate_steps, gens, self.eta, dtype=self.dtype)
        mask = self.trusted_blocks(x, located)
        back = self.op.pinv(self.op(x))
        start = self.start_point(x, located)

        def project(x0: torch.Tensor) -> torch.Tensor:
            return x0 + mask * (back - self.op.pinv(self.op(x0)))

        x_t = q_sample(self.model, start, self.t_start, noise_like(x, gens))
        out = reverse(self.model, x_t, self.t_start, self.steps, gens, self.eta, project=project,
                      project_steps=self.guide_steps, dtype=self.dtype)
        nfe = torch.full((x.shape[0],), self.locate_steps + self.steps, dtype=torch.long)
        return PurifyResult(out, nfe)
