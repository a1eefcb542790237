"""ZIP (Shi et al., "Black-box Backdoor Defense via Zero-shot Image Purification", NeurIPS 2023): degrade with a
linear A that breaks the trigger, restore zero-shot with DDNM range-null-space steps (Wang et al., "Zero-Shot Image
Restoration Using Denoising Diffusion Null-Space Model", ICLR 2023).

At every step the x0 prediction keeps only its null-space part and takes its range-space part from the measurement:
x0' = A+ y + (I - A+ A) x0. Starting from a noised A+ y at an intermediate state (not pure noise) is what makes a
few DDIM steps enough. `combine="average"` reproduces the public code, which corrects for each operator separately
and averages (it is not a joint constraint); the default composes them into one operator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.purify.base import Purifier
from pipeline.purify.degradations import Compose, Degradation, parse_degradation
from pipeline.purify.models import DiffusionModel
from pipeline.purify.sampling import PurifyResult, check_eta, generators, noise_like, q_sample, reverse, state_grid


class ZIP(Purifier):
    name = "zip"

    def __init__(self, model: DiffusionModel, degradation: str = "pool2", t_start: int = 400, steps: int = 20,
                 eta: float = 1.0, combine: str = "compose", **kw: Any) -> None:
        super().__init__(model, **kw)
        if combine not in ("compose", "average"):
            raise ValueError(f"combine must be 'compose' or 'average', got {combine!r}")
        if not 1 <= t_start <= model.num_train_timesteps:
            raise ValueError(f"t_start must be in [1, {model.num_train_timesteps}], got {t_start}")
        state_grid(t_start, steps)
        self.op: Degradation = parse_degradation(degradation)
        self.op.check(model.channels, model.image_size)
        self.degradation, self.combine = degradation, combine
        # The projection would copy the whole input, trigger included, back; under `average` each operator is a
        # projection of its own, so one identity among them copies half the input back.
        for op in self._ops():
            if op.is_identity(model.channels):
                alone = " (combine: average corrects for each operator alone)" if op is not self.op else ""
                raise ValueError(f"degradation {op.name!r} is the identity on a {model.channels}-channel model: ZIP "
                                 f"would restore nothing there{alone}; use poolK (K >= 2) or blurSIGMA")
        self.t_start, self.steps, self.eta = int(t_start), int(steps), check_eta(eta)

    def method_params(self) -> dict[str, Any]:
        return {"degradation": self.degradation, "t_start": self.t_start, "steps": self.steps, "eta": self.eta,
                "combine": self.combine}

    @property
    def nominal_nfe(self) -> float:
        return float(self.steps)

    def _ops(self) -> list[Degradation]:
        if self.combine == "average" and isinstance(self.op, Compose):
            return list(self.op.ops)
        return [self.op]

    def projection(self, x: torch.Tensor):
        """The DDNM hook for measurements y = A x (x0 -> A+ y + (I - A+ A) x0), and A+ y (the starting point)."""
        ops = self._ops()
        ys = [op(x) for op in ops]
        backs = [op.pinv(y).expand_as(x) for op, y in zip(ops, ys)]

        def project(x0: torch.Tensor) -> torch.Tensor:
            fixed = [b + x0 - op.pinv(op(x0)).expand_as(x0) for op, b in zip(ops, backs)]
            return torch.stack(fixed).mean(0) if len(fixed) > 1 else fixed[0]

        start = torch.stack(backs).mean(0) if len(backs) > 1 else backs[0]
        return project, start

    def _purify(self, x: torch.Tensor, keys: Sequence[str], seed: int) -> PurifyResult:
        gens = generators(keys, seed)
        project, start = self.projection(x)
        x_t = q_sample(self.model, start.clamp(-1, 1), self.t_start, noise_like(x, gens))
        out = reverse(self.model, x_t, self.t_start, self.steps, gens, self.eta, project=project, dtype=self.dtype)
        return PurifyResult(out, torch.full((x.shape[0],), self.steps, dtype=torch.long))
