"""SDEdit / DiffPure baseline: noise every image to state t_start, then denoise in a few DDIM steps.

SDEdit (Meng et al., "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential Equations", ICLR 2022)
edits an image by diffusing it part-way and reversing; DiffPure (Nie et al., "Diffusion Models for Adversarial
Purification", ICML 2022) uses the same forward-then-reverse pass to wash out adversarial perturbations, here
backdoor triggers. t_start trades removal (a trigger must drown in the noise) against content (the model
re-imagines what drowned). The reverse pass is sampling.reverse: DDIM steps, stochastic when eta > 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.purify.base import Purifier
from pipeline.purify.models import DiffusionModel
from pipeline.purify.sampling import PurifyResult, check_eta, generators, noise_like, q_sample, reverse, state_grid


class SDEdit(Purifier):
    name = "sdedit"

    def __init__(self, model: DiffusionModel, t_start: int = 250, steps: int = 10, eta: float = 0.0,
                 **kw: Any) -> None:
        super().__init__(model, **kw)
        if not 1 <= t_start <= model.num_train_timesteps:
            raise ValueError(f"t_start must be in [1, {model.num_train_timesteps}], got {t_start}")
        state_grid(t_start, steps)  # validates steps
        self.t_start, self.steps, self.eta = int(t_start), int(steps), check_eta(eta)

    def method_params(self) -> dict[str, Any]:
        return {"t_start": self.t_start, "steps": self.steps, "eta": self.eta}

    @property
    def nominal_nfe(self) -> float:
        return float(self.steps)

    def _purify(self, x: torch.Tensor, keys: Sequence[str], seed: int) -> PurifyResult:
        gens = generators(keys, seed)
        x_t = q_sample(self.model, x, self.t_start, noise_like(x, gens))
        out = reverse(self.model, x_t, self.t_start, self.steps, gens, self.eta, dtype=self.dtype)
        return PurifyResult(out, torch.full((x.shape[0],), self.steps, dtype=torch.long))
