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
from pipeline.purify.cascade import Cascade, escalation_seeds, finish_cascade
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
    """Cascade only: k-1 more passes (other seeds) for rows whose label flipped; other rows pass through."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.cascade is not None, "EscalateStage needs method=cascade"
        n = len(batch["key"])
        k = self.cascade.k
        extra = np.zeros((n, max(k - 1, 0), *batch["image"].shape[1:]), dtype=np.uint8)
        rows = np.flatnonzero(_ok_rows(batch) & batch["flagged"])
        nfe = np.array(batch["nfe"], dtype=np.float32)  # blocks arrive read-only (zero-copy from the store)
        if rows.size:
            keys = [str(x) for x in batch["key"][rows]]
            with torch.inference_mode():
                for j, s in enumerate(escalation_seeds(self.seed, k)):
                    res = self.purifier(batch["image"][rows], keys, s)
                    extra[rows, j] = res.uint8()
                    nfe[rows] += res.nfe.numpy()
        batch["nfe"] = nfe
        batch["extra"] = extra
        batch["escalated"] = np.isin(np.arange(n), rows)
        return batch


class VoteStage(QueryStage):
    """Cascade only: query the extra passes of escalated rows, vote, and keep an image that carries the vote."""

    def __init__(self, uri: str, spec: dict[str, Any], options: dict[str, Any], vote_original: bool) -> None:
        super().__init__(uri, spec, options)
        self.vote_original = vote_original

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        extra = batch.pop("extra")
        escalated = batch.pop("escalated")
        n, m = extra.shape[:2]
        votes = np.full((n, 1 + m), -1, np.int64)
        votes[:, 0] = batch["pred_purified"]
        rows = np.flatnonzero(escalated & _ok_rows(batch))
        if rows.size and m:
            flat = extra[rows].reshape(rows.size * m, *extra.shape[2:])
            pred = self.predict(flat)
            votes[rows, 1:] = pred.labels.reshape(rows.size, m)
            # A failed vote is only a missing vote; the first pass already gave this row a label.
        passes = np.concatenate([batch["purified"][:, None], extra], 1)
        out = finish_cascade(batch["pred_orig"], votes, passes, batch["nfe"].astype(np.float64), self.vote_original)
        good = _ok_rows(batch)
        batch["purified"] = out.images
        batch["pred_purified"] = np.where(good, out.labels, batch["pred_purified"])
        batch["flag_score"] = np.where(good, out.flag_score, batch["flag_score"]).astype(np.float32)
        batch["flagged"] = np.where(good, out.labels != batch["pred_orig"], batch["flagged"])
        # Scores of the voted image are not re-queried; the first pass's score no longer describes it.
        batch["score_purified"] = np.where(escalated, np.nan, batch["score_purified"]).astype(np.float32)
        return batch
