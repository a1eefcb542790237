"""The Ray Data callable classes: purify (GPU actor), query (CPU actor), cascade escalation, and the output encoder.

Everything Ray-specific lives here and in job.py; each stage only adapts a numpy batch to the pure functions in
pipeline/purify, pipeline/blackbox and pipeline/sink. Rows that already carry an error pass through untouched, so a
bad input becomes an error row instead of failing its block.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.blackbox import InputSpec, open_blackbox
from pipeline.purify import build_purifier, load_model
from pipeline.purify.cascade import Cascade, escalation_seeds, finish_cascade, needs_pass, original_ballots
from pipeline.sink import is_empty_error

log = logging.getLogger(__name__)


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _ok_rows(batch: dict[str, np.ndarray]) -> np.ndarray:
    return np.array([is_empty_error(e) for e in batch["error"]], dtype=bool)


def _set_errors(batch: dict[str, np.ndarray], rows: np.ndarray, reasons: list[str | None]) -> None:
    err = np.array([None if is_empty_error(e) else e for e in batch["error"]], dtype=object)
    for i, r in zip(rows, reasons):
        if r is not None and err[i] is None:
            err[i] = r
    batch["error"] = err


class PurifyStage:
    """Holds the diffusion model; runs one pass (for a cascade: its first pass) on every good row."""

    def __init__(self, model: str, device: str, dtype: str, method: str, params: dict[str, Any], seed: int,
                 torch_threads: int | None = None) -> None:
        self.device = pick_device(device)
        if self.device == "cpu":
            # Ray pins OMP threads to the actor's (fractional) logical CPUs; CPU purification wants the cores.
            torch.set_num_threads(torch_threads or os.cpu_count() or 1)
        self.model = load_model(model, self.device)
        built = build_purifier(method, self.model, params, dtype=dtype)
        self.cascade = built if isinstance(built, Cascade) else None
        self.purifier = built.base if isinstance(built, Cascade) else built
        self.method = method
        self.params_json = json.dumps(built.params(), sort_keys=True)
        self.seed = seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = _ok_rows(batch)
        images = batch["image"]
        purified = np.zeros_like(images)
        nfe = np.zeros(len(images), dtype=np.float32)
        rows = np.flatnonzero(ok)
        if rows.size:
            keys = [str(k) for k in batch["key"][rows]]
            try:
                with torch.inference_mode():
                    res = self.purifier(images[rows], keys, self.seed)
                purified[rows] = res.uint8()
                nfe[rows] = res.nfe.numpy()
            except (ValueError, TypeError) as exc:  # a shape the model cannot take: rows fail, the job goes on
                _set_errors(batch, rows, [f"purify: {exc}"] * len(rows))
        batch["purified"] = purified
        batch["nfe"] = nfe
        batch["method"] = np.full(len(images), self.method, dtype=object)
        batch["params"] = np.full(len(images), self.params_json, dtype=object)
        return batch


def fit_to_spec(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Resize / convert channels so that a model-sized uint8 batch matches what the black box takes."""
    n, c, h, w = images.shape
    if (c, h, w) == (spec.channels, spec.size, spec.size):
        return images
    x = torch.from_numpy(images).float()
    if c != spec.channels:
        x = x.mean(1, keepdim=True) if spec.channels == 1 else x.expand(n, spec.channels, h, w)
    if (h, w) != (spec.size, spec.size):
        x = F.interpolate(x, size=(spec.size, spec.size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


class QueryStage:
    """Asks the black box about the original and the purified image of every good row, in one call."""

    def __init__(self, uri: str, spec: dict[str, Any], options: dict[str, Any]) -> None:
        self.spec = InputSpec(**spec)
        self.bb = open_blackbox(uri, self.spec, **options)

    def predict(self, images: np.ndarray):
        return self.bb.predict(fit_to_spec(images, self.spec))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        rows = np.flatnonzero(_ok_rows(batch))
        pred_orig = np.full(n, -1, np.int64)
        pred_pur = np.full(n, -1, np.int64)
        score_orig = np.full(n, np.nan, np.float32)
        score_pur = np.full(n, np.nan, np.float32)
        flag_score = np.full(n, np.nan, np.float32)
        if rows.size:
            m = rows.size
            pred = self.predict(np.concatenate([batch["image"][rows], batch["purified"][rows]]))
            pred_orig[rows], pred_pur[rows] = pred.labels[:m], pred.labels[m:]
            if pred.scores is not None:
                s = pred.scores
                score_orig[rows] = s[np.arange(m), np.maximum(pred.labels[:m], 0)]
                score_pur[rows] = s[m + np.arange(m), np.maximum(pred.labels[m:], 0)]
                # How much purification took away from the original answer's probability.
                flag_score[rows] = score_orig[rows] - s[m + np.arange(m), np.maximum(pred.labels[:m], 0)]
            else:
                flag_score[rows] = (pred_orig[rows] != pred_pur[rows]).astype(np.float32)
            reasons = [e1 or e2 for e1, e2 in zip(pred.errors[:m], pred.errors[m:])]
            _set_errors(batch, rows, [None if r is None else f"black box: {r}" for r in reasons])
        batch.update(pred_orig=pred_orig, pred_purified=pred_pur, score_orig=score_orig,
                     score_purified=score_pur, flag_score=flag_score)
        batch["flagged"] = (pred_orig != pred_pur) & (pred_orig >= 0) & (pred_pur >= 0)
        return batch


class EscalateStage(PurifyStage):
    """Cascade only, one per extra pass j (1 <= j < k): pass j (its own seed) for the rows whose vote is still
    open (`needs_pass`); other rows pass through. Carries `votes` (N, k) and `passes` (N, k, C, H, W) onwards."""

    def __init__(self, pass_index: int, **kw: Any) -> None:
        super().__init__(**kw)
        assert self.cascade is not None, "EscalateStage needs method=cascade"
        if not 1 <= pass_index < self.cascade.k:
            raise ValueError(f"pass_index must be in [1, {self.cascade.k}), got {pass_index}")
        self.j = pass_index

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        c, j = self.cascade, self.j
        assert c is not None
        n = len(batch["key"])
        if j == 1:
            votes = np.full((n, c.k), -1, np.int64)
            votes[:, 0] = batch["pred_purified"]
            passes = np.zeros((n, c.k, *batch["image"].shape[1:]), dtype=np.uint8)
            passes[:, 0] = batch["purified"]
        else:  # blocks arrive read-only (zero-copy from the object store)
            votes, passes = np.array(batch["votes"]), np.array(batch["passes"])
        ballots = c.ballots(batch["pred_orig"], batch["score_orig"])
        open_rows = needs_pass(batch["pred_orig"], votes[:, :j], c.k, c.escalate, ballots)
        rows = np.flatnonzero(_ok_rows(batch) & open_rows)
        nfe = np.array(batch["nfe"], dtype=np.float32)
        if rows.size:
            keys = [str(x) for x in batch["key"][rows]]
            with torch.inference_mode():
                res = self.purifier(batch["image"][rows], keys, escalation_seeds(self.seed, c.k)[j - 1])
            passes[rows, j] = res.uint8()
            nfe[rows] += res.nfe.numpy()
        batch.update(nfe=nfe, votes=votes, passes=passes, pending=np.isin(np.arange(n), rows))
        return batch


class VoteStage(QueryStage):
    """Cascade only, after each EscalateStage: query pass j of the rows that ran it; after the last pass, vote
    and keep an image that carries the vote."""

    def __init__(self, uri: str, spec: dict[str, Any], options: dict[str, Any], original_votes: int,
                 original_below: float | None, pass_index: int, last: bool) -> None:
        super().__init__(uri, spec, options)
        self.original_votes, self.original_below = original_votes, original_below
        self.j, self.last = pass_index, last

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pending = batch.pop("pending")
        votes = np.array(batch["votes"])
        rows = np.flatnonzero(pending & _ok_rows(batch))
        if rows.size:
            # A failed vote is only a missing vote (-1); the first pass already gave this row a label.
            votes[rows, self.j] = self.predict(batch["passes"][rows, self.j]).labels
        batch["votes"] = votes
        if not self.last:
            return batch
        passes = batch.pop("passes")
        batch.pop("votes")
        ballots = original_ballots(batch["pred_orig"], batch["score_orig"], self.original_votes, self.original_below)
        out = finish_cascade(batch["pred_orig"], votes, passes, batch["nfe"].astype(np.float64), ballots)
        good = _ok_rows(batch)
        escalated = (votes[:, 1:] >= 0).any(1)
        batch["purified"] = out.images
        batch["pred_purified"] = np.where(good, out.labels, batch["pred_purified"])
        batch["flag_score"] = np.where(good, out.flag_score, batch["flag_score"]).astype(np.float32)
        batch["flagged"] = np.where(good, out.labels != batch["pred_orig"], batch["flagged"])
        # Scores of the voted image are not re-queried; the first pass's score no longer describes it.
        batch["score_purified"] = np.where(escalated, np.nan, batch["score_purified"]).astype(np.float32)
        return batch
