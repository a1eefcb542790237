"""The black-box classifier interface and its input/output conventions; the query budget every client keeps.
The machinery of remote clients (requests, retries, rate limit, auth) is in `remote.py`.

A black box is only ever *queried*: images go in, labels (and scores when the model gives them) come out. Per-request
failures never raise: a failed row gets label -1 and an error string, so a long job keeps going and the metrics can
count failures as wrong answers instead of silently dropping rows.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

SCALES = ("unit", "signed", "uint8")
# Open Inference Protocol v2 tensor datatypes we can send images as.
V2_DTYPES: dict[str, np.dtype] = {
    "FP32": np.dtype(np.float32), "FP16": np.dtype(np.float16), "FP64": np.dtype(np.float64),
    "UINT8": np.dtype(np.uint8), "INT8": np.dtype(np.int8), "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
}
BUDGET_EXHAUSTED = "query budget exhausted"
# Largest response body a remote client reads (counted after gzip/deflate inflation): a 256-row batch of scores
# over 1,000 classes is about 5 MB of JSON; past this the answer is a bomb, not a prediction.
DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024
# Label ids an answer may carry without scores: later code allocates by the largest label (vote tallies), so an id
# a hostile or broken endpoint makes up must never reach it. The largest public label sets stay far below this.
MAX_LABEL = 100_000
# How far from 1 a row of scores in [0, 1] may sum and still be read as probabilities rather than logits: an endpoint
# that rounds to 3 decimals is off by up to 5e-4 a class (a few 1e-3 over tens of classes, about 1e-2 at random
# over a thousand), and fp16 by about 5e-4 in all. Logits that pass are a rare coincidence, and the label is the
# argmax either way.
PROB_SUM_TOLERANCE = 1e-2
# Longest error text kept on a row; cut only after redaction, so a secret near the cut cannot survive in part.
MAX_ERROR_CHARS = 300


class BlackBoxUnavailable(RuntimeError):
    """Raised by check(): the model file or endpoint is not there or not ready."""


@dataclass(frozen=True)
class InputSpec:
    """How the black box wants its input; comes from config."""

    size: int = 28  # H = W
    channels: int = 1
    scale: str = "unit"  # "unit" float in [0,1], "signed" [-1,1], "uint8" raw 0..255 (as float or uint8 per datatype)
    input_name: str = "input-0"
    datatype: str = "FP32"

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"InputSpec.scale must be one of {SCALES}, got {self.scale!r}")
        if self.datatype not in V2_DTYPES:
            raise ValueError(f"InputSpec.datatype must be one of {tuple(V2_DTYPES)}, got {self.datatype!r}")
        if self.scale != "uint8" and V2_DTYPES[self.datatype].kind != "f":
            raise ValueError(f"scale {self.scale!r} needs a float datatype, got {self.datatype}")
        if self.size <= 0 or self.channels <= 0:
            raise ValueError("InputSpec.size and channels must be positive")


@dataclass
class Prediction:
    labels: np.ndarray  # int64 (N,), -1 where the query failed
    scores: np.ndarray | None  # float32 (N, K) probabilities when the model gives logits/probs, else None
    errors: list[str | None] = field(default_factory=list)  # per row: None when fine, else a short reason
    # Per row: True where the failure can pass by itself (endpoint down or slow, budget, auth, throttling), so a
    # later run must ask again; False where it is fine or the black box refused the row's own data (HTTP 400/415/
    # 422 to a request of that row alone, while it answered other images). None: every failed row is retryable.
    retryable: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.retryable is None:
            self.retryable = np.array([e is not None for e in self.errors], dtype=bool)
        self.retryable = np.asarray(self.retryable, dtype=bool)

    @property
    def failed(self) -> np.ndarray:
        return np.array([e is not None for e in self.errors], dtype=bool)

    @classmethod
    def concat(cls, parts: Sequence[Prediction]) -> Prediction:
        if not parts:
            return cls(np.zeros(0, np.int64), None, [])
        labels = np.concatenate([p.labels for p in parts]).astype(np.int64)
        errors = [e for p in parts for e in p.errors]
        retryable = np.concatenate([p.retryable for p in parts]).astype(bool)
        return cls(labels, _merge_scores([p.scores for p in parts], [len(p.labels) for p in parts]), errors,
                   retryable).consistent()

    def consistent(self) -> Prediction:
        """Every answered label indexes the scores: where one request answered scores and another bare labels
        (a model swap or a mixed deployment behind one URL), a bare label outside the K score columns fails its
        row instead of reaching code that reads ``scores[row, label]``. Failed rows keep label -1."""
        failed = self.failed
        k = self.scores.shape[1] if self.scores is not None else MAX_LABEL + 1
        bad = ~failed & ((self.labels < 0) | (self.labels >= k))
        if bad.any():
            for i in np.flatnonzero(bad):
                self.errors[i] = (f"bad response: label {int(self.labels[i])} outside the {k} classes of the "
                                  "other answers")
            self.labels = np.where(bad, -1, self.labels)
            self.retryable = self.retryable | bad  # the endpoint's answer, not the row's data
        self.labels = np.where(self.failed, -1, self.labels).astype(np.int64)
        return self


def _merge_scores(scores: Sequence[np.ndarray | None], lengths: Sequence[int]) -> np.ndarray | None:
    """Concatenate per-chunk scores; rows of failed chunks become NaN so shapes still line up with labels."""
    widths = {s.shape[1] for s in scores if s is not None}
    if len(widths) != 1:
        return None  # no scores at all, or chunks disagree on K (a model swap mid-run): scores are not comparable
    k = widths.pop()
    return np.concatenate([s if s is not None else np.full((n, k), np.nan, np.float32)
                           for s, n in zip(scores, lengths, strict=True)]).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Input / output conventions shared by all clients.


def validate_images(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Check images are uint8 (N, C, H, W) at the spec's size; (N, H, W) is accepted for 1-channel specs."""
    if not isinstance(images, np.ndarray):
        raise ValueError(f"images must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, C, H, W), got dtype {images.dtype}")
    if images.ndim == 3 and spec.channels == 1:
        images = images[:, None]
    expected = (spec.channels, spec.size, spec.size)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(f"images must be uint8 (N, {expected[0]}, {expected[1]}, {expected[2]}) for {spec}, "
                         f"got shape {images.shape}")
    return images


def to_model_input(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 (N, C, H, W) -> the array the model is fed, per spec.scale and spec.datatype."""
    dtype = V2_DTYPES[spec.datatype]
    if spec.scale == "uint8":
        return images.astype(dtype)
    # float32 arithmetic matches what torchvision's ToTensor and most exporters do, so labels agree bit-for-bit
    x = images.astype(np.float32)
    x = x / np.float32(255.0) if spec.scale == "unit" else x / np.float32(127.5) - np.float32(1.0)
    return x.astype(dtype)


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def parse_output(out: np.ndarray, n: int) -> Prediction:
    """Model output -> Prediction (labels int64 (n,), scores float32 (n, K) or None, per-row errors).

    (n, K>1): logits or probabilities (each row on its own: kept if it already is a distribution, else softmaxed),
    label = argmax; a row with a NaN or inf fails alone (retryable, like a label out of range).
    (n,) or (n, 1) with integer values: labels directly; a label outside [0, MAX_LABEL] fails its row (retryable:
    it is the endpoint's answer, not the row's data). Raises ValueError if the output as a whole is uninterpretable.
    """
    out = np.asarray(out)
    if out.ndim == 0 or out.shape[0] != n:
        raise ValueError(f"output has shape {out.shape}, expected a first dimension of {n}")
    if out.ndim == 2 and out.shape[1] > 1:
        if out.shape[1] > MAX_LABEL + 1:
            raise ValueError(f"output has {out.shape[1]} score columns, more than {MAX_LABEL + 1} classes")
        x = out.astype(np.float64)
        # A NaN or inf (say an fp16 overflow on one image) fails its own row, not the request's other rows.
        finite = np.isfinite(x).all(axis=1)
        x = np.where(finite[:, None], x, 0.0)
        # Decided per row: a row's scores must not depend on the rows it was sent with (one row off the tolerance
        # would otherwise softmax its batch-mates' probabilities).
        is_dist = (np.all((x >= 0) & (x <= 1), axis=1)
                   & (np.abs(x.sum(axis=1) - 1.0) <= PROB_SUM_TOLERANCE))[:, None]
        probs = np.where(finite[:, None], np.where(is_dist, x, _softmax(x)), np.nan)
        labels = np.where(finite, np.argmax(x, axis=1), -1).astype(np.int64)
        errors = [None if f else "bad response: NaN or inf among the scores" for f in finite.tolist()]
        return Prediction(labels, probs.astype(np.float32), errors)
    if out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):
        flat = out.reshape(n)
        if flat.dtype.kind == "f" and np.all(np.isfinite(flat)) and np.allclose(flat, np.round(flat)):
            flat = np.round(flat)
        elif flat.dtype.kind not in "iub":
            raise ValueError(f"output of shape {out.shape} is not integer labels")
        # compared before the int64 cast: a uint64 or float id past 2**63 must not wrap into range
        bad = (flat < 0) | (flat > MAX_LABEL)
        labels = np.where(bad, -1, flat).astype(np.int64)
        errors = [f"bad response: label {v} outside [0, {MAX_LABEL}]" if b else None
                  for v, b in zip(flat.tolist(), bad.tolist(), strict=True)]
        return Prediction(labels, None, errors)
    raise ValueError(f"cannot interpret output of shape {out.shape} (want (N, K) scores or (N,) labels)")


# ---------------------------------------------------------------------------------------------------------------
# Counters.


class Stats:
    """Thread-safe counters. Invariants: rows == ok + failures; attempts == queries + retries;
    images == rows - budget_rejected (every row that was not refused by the budget was sent in some query)."""

    _LAT_WINDOW = 10_000  # percentiles over the latest attempts: bounded memory on unbounded streams

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c = {"rows": 0, "images": 0, "queries": 0, "attempts": 0, "retries": 0, "ok": 0, "failures": 0,
                   "budget_rejected": 0}
        self._lat: deque[float] = deque(maxlen=self._LAT_WINDOW)
        self._lat_sum = 0.0
        self._lat_n = 0

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                self._c[k] += v

    def latency(self, ms: float) -> None:
        with self._lock:
            self._lat.append(ms)
            self._lat_sum += ms
            self._lat_n += 1

    def snapshot(self) -> dict:
        with self._lock:
            d: dict = dict(self._c)
            lat = np.array(self._lat) if self._lat else None
            d["latency_ms_mean"] = self._lat_sum / self._lat_n if self._lat_n else 0.0
            d["latency_ms_p50"] = float(np.percentile(lat, 50)) if lat is not None else 0.0
            d["latency_ms_p95"] = float(np.percentile(lat, 95)) if lat is not None else 0.0
        return d


# ---------------------------------------------------------------------------------------------------------------
# The interface.


class BlackBox(ABC):
    """A queried-only classifier. Instances made by ``open_blackbox`` pickle as the recipe to reopen them (URI, spec,
    options: env-var *names*, never secret values), so Ray can ship one to its actors; each copy starts with fresh
    counters and its own query budget."""

    spec: InputSpec
    _reopen: tuple[str, InputSpec | None, dict] | None = None

    @abstractmethod
    def predict(self, images: np.ndarray) -> Prediction:
        """images uint8 (N, C, H, W) at spec size. Never raises for per-request failures (label -1 + error)."""

    @abstractmethod
    def check(self) -> None:
        """Raise BlackBoxUnavailable with a clear message if the model is not reachable / ready."""

    @abstractmethod
    def probe(self) -> None:
        """Prove the model answers: one 1-image request at the spec's size, through the same path and credentials
        as every query, not counted against the query budget or in stats. Raises BlackBoxUnavailable with a
        secret-free reason (e.g. the HTTP status of a refused token) when the answer is not a usable prediction."""

    @abstractmethod
    def stats(self) -> dict:
        """Counters: queries, images, retries, failures, latency_ms_mean/p50/p95 (and more per client)."""

    def close(self) -> None:  # noqa: B027 - optional hook, most clients have something to release
        pass

    def __reduce__(self) -> tuple:
        if self._reopen is None:
            raise TypeError(f"{type(self).__name__} was not made by open_blackbox() and cannot be pickled")
        from . import _reopen_blackbox

        return (_reopen_blackbox, self._reopen)

    def __enter__(self) -> BlackBox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# Shared engine for remote clients (v2 REST, SageMaker): split, bound concurrency, budget, rate limit, retries.


class QueryBudget:
    """Max number of images a client may send; reserved up front, in call order, so which rows get refused does not
    depend on thread scheduling. Retries of an image do not count again: the budget is on distinct rows queried."""

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 0:
            raise ValueError("query_budget must be >= 0")
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> int:
        """How many of the next n rows may be sent."""
        if self.limit is None:
            return n
        with self._lock:
            allowed = max(0, min(n, self.limit - self.used))
            self.used += allowed
        return allowed

    @property
    def left(self) -> int | None:
        return None if self.limit is None else self.limit - self.used


def budget_refusal(n: int) -> Prediction:
    return Prediction(np.full(n, -1, np.int64), None, [BUDGET_EXHAUSTED] * n)


class BudgetedBlackBox(BlackBox):
    """What every client does around its queries: validate, count, reserve the query budget, answer the rows past it
    with a refusal. Subclasses implement ``_predict_allowed`` for the rows within the budget."""

    def __init__(self, query_budget: int | None) -> None:
        self._budget = QueryBudget(query_budget)
        self._stats = Stats()

    @abstractmethod
    def _predict_allowed(self, images: np.ndarray) -> list[Prediction]:
        """Answers (in row order) for validated, non-empty images that the budget allows."""

    def predict(self, images: np.ndarray) -> Prediction:
        images = validate_images(images, self.spec)
        n = len(images)
        self._stats.add(rows=n)
        if n == 0:
            return Prediction(np.zeros(0, np.int64), None, [])
        allowed = self._budget.reserve(n)
        parts = self._predict_allowed(images[:allowed]) if allowed else []
        if allowed < n:
            self._stats.add(budget_rejected=n - allowed, failures=n - allowed)
            parts.append(budget_refusal(n - allowed))
        failed_before = sum(int(p.failed.sum()) for p in parts)
        pred = Prediction.concat(parts)
        newly = int(pred.failed.sum()) - failed_before  # rows whose label did not fit the other chunks' scores
        if newly:
            self._stats.add(ok=-newly, failures=newly)
        return pred

    def stats(self) -> dict:
        d = self._stats.snapshot()
        d["budget_left"] = self._budget.left
        return d
