"""Purification methods: pure batched torch, no Ray. `build_purifier` maps a config's method + params to one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.gate import gate_params
from pipeline.purify.base import Purifier
from pipeline.purify.cascade import DEFAULTS as CASCADE_DEFAULTS
from pipeline.purify.cascade import GUIDED_BASE, SDEDIT_BASE, Cascade
from pipeline.purify.guided import Guided
from pipeline.purify.models import DiffusionModel, load_model
from pipeline.purify.sampdetox import LocalRepair, SampDetox
from pipeline.purify.sampling import PurifyResult
from pipeline.purify.sdedit import SDEdit
from pipeline.purify.zip import ZIP


class Identity(Purifier):
    """No purification (the undefended baseline): 0 NFE."""

    name = "none"

    def method_params(self) -> dict[str, Any]:
        return {}

    @property
    def nominal_nfe(self) -> float:
        return 0.0

    def _purify(self, x: torch.Tensor, keys: Sequence[str], seed: int) -> PurifyResult:
        return PurifyResult(x, torch.zeros(x.shape[0], dtype=torch.long))


METHODS: dict[str, type[Purifier]] = {"none": Identity, "sdedit": SDEdit, "zip": ZIP, "sampdetox": SampDetox,
                                     "repair": LocalRepair, "guided": Guided}


def build_purifier(method: str, model: DiffusionModel, params: dict[str, Any] | None = None,
                   dtype: str = "float32") -> Purifier | Cascade:
    """Construct (and so validate) a method. Cascade takes `base` (a method name), `k`, `escalate`,
    `original_votes`, `original_below`, `original_quantile`, `calibration_rows`, `original_support`, `pick`, and the
    base's own params; unknown params raise a TypeError naming them."""
    params = dict(params or {})
    if method == "cascade":
        base = params.pop("base", CASCADE_DEFAULTS["base"])
        k = params.pop("k", CASCADE_DEFAULTS["k"])
        escalate = params.pop("escalate", CASCADE_DEFAULTS["escalate"])
        original_votes = params.pop("original_votes", None)  # None: Cascade's default, at most k
        original_support = params.pop("original_support", CASCADE_DEFAULTS["original_support"])
        pick = params.pop("pick", CASCADE_DEFAULTS["pick"])
        original_quantile, original_below, calibration_rows = gate_params(params)
        for name in ("original_quantile", "original_below", "calibration_rows"):
            params.pop(name, None)
        if base == "cascade":
            raise ValueError("a cascade's base must be a single-pass method")
        for name, value in {"sdedit": SDEDIT_BASE, "guided": GUIDED_BASE}.get(base, {}).items():
            params.setdefault(name, value)
        return Cascade(build_purifier(base, model, params, dtype), k=k,  # type: ignore[arg-type]
                       escalate=escalate, original_votes=original_votes, original_below=original_below,
                       original_quantile=original_quantile, calibration_rows=calibration_rows,
                       original_support=original_support, pick=pick)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted([*METHODS, 'cascade'])}")
    try:
        return METHODS[method](model, dtype=dtype, **params)
    except TypeError as exc:
        raise TypeError(f"bad params for method {method!r}: {exc}") from exc


__all__ = ["Cascade", "DiffusionModel", "Purifier", "PurifyResult", "build_purifier", "load_model", "METHODS"]
