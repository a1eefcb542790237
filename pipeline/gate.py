"""The vote's original-label gate without torch: its defaults, how a method's params name it, and its measurement.

The driver measures a job's gate once (pipeline/job.py) and must not load torch to do so; `build_purifier` reads the
same rules from here, so both agree on what the params mean. What the gate is for: pipeline/purify/cascade.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np

GATE_DEFAULTS: dict[str, Any] = {"original_votes": 3, "original_below": 0.95, "original_quantile": 0.3,
                                 "calibration_rows": 256, "original_support": 0.3}


def gate_params(params: dict[str, Any]) -> tuple[float | None, float | None, int]:
    """(original_quantile, original_below, calibration_rows) as a vote's params name them. `original_below` alone is
    a fixed gate (no quantile); with `original_quantile` it is that quantile's measurement; a measured gate not yet
    measured has no threshold (None)."""
    if "original_below" in params and "original_quantile" not in params:
        quantile = None
    else:
        quantile = params.get("original_quantile", GATE_DEFAULTS["original_quantile"])
    below = params.get("original_below", None if quantile is not None else GATE_DEFAULTS["original_below"])
    return quantile, below, params.get("calibration_rows", GATE_DEFAULTS["calibration_rows"])


def top_probability(labels: np.ndarray, scores: np.ndarray | None) -> np.ndarray | None:
    """Each answered row's top probability (NaN where the query failed); None for an answer without usable scores
    (a label-only black box)."""
    labels = np.asarray(labels)
    if scores is None:
        return None
    s = np.asarray(scores, np.float32)
    if s.ndim != 2 or len(s) != len(labels):
        return None
    return np.where(labels >= 0, s.max(1), np.nan)


def gate_threshold(top_scores: np.ndarray | None, quantile: float) -> float:
    """The measured gate: the `quantile` of a black box's top probability over some of its answers (NaN rows, a
    failed query, left out). 0.0, a gate that never opens, when there is nothing to measure (a label-only black box)."""
    if top_scores is None:
        return 0.0
    s = np.asarray(top_scores, np.float64)
    s = s[~np.isnan(s)]
    return float(np.quantile(s, quantile)) if s.size else 0.0
