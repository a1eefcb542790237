"""The engine of remote clients (v2 REST, SageMaker): split a batch into requests, bound the concurrency, space
requests by a rate limit, retry what can pass with backoff and jitter (honouring Retry-After), build auth headers
from environment variables, and redact their values from every message before anything is cut or logged."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from urllib.parse import quote

import numpy as np
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from .base import (
    DEFAULT_MAX_RESPONSE_BYTES,
    MAX_ERROR_CHARS,
    BlackBoxUnavailable,
    BudgetedBlackBox,
    InputSpec,
    Prediction,
    parse_output,
    to_model_input,
)

log = logging.getLogger(__name__)


class RetryableError(Exception):
    """A transient failure worth retrying; ``reason`` is short and secret-free, ``retry_after`` in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class FatalError(Exception):
    """A failure retrying now cannot fix (4xx, undecodable response): the rows fail at once. ``retryable`` says
    whether a later run may still succeed (False only where the black box refused the row's own data);
    ``status`` is the HTTP status when there was one."""

    def __init__(self, reason: str, retryable: bool = True, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.status = status


class ResponseTooLargeError(FatalError):
    """The answer passed ``max_response_bytes``. A smaller request has a smaller answer, so the engine halves the
    request, as for a 413, instead of failing its rows for good."""

    def __init__(self, cap: int) -> None:
        super().__init__(f"bad response: response larger than {cap} bytes")
        self.cap = cap


def redact_cut(text: str, redact: Callable[[str], str], limit: int = MAX_ERROR_CHARS) -> str:
    """Redact, then cut: cutting first can split a secret so that the redactor no longer sees it whole."""
    return redact(text)[:limit]


def parse_retry_after(value: str | None, cap_s: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), capped so one header cannot stall a job."""
    if not value:
        return None
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            secs = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            return None
    if not math.isfinite(secs):
        return None
    return min(max(secs, 0.0), cap_s)


class RateLimiter:
    """Spaces request starts at least 1/qps apart across all threads (a token bucket of depth 1)."""

    def __init__(self, qps: float) -> None:
        if qps <= 0:
            raise ValueError("rate_limit_qps must be > 0")
        self._interval = 1.0 / qps
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self._interval
        if start > now:
            time.sleep(start - now)


def headers_from_env(auth_env: str | None, header_env: Mapping[str, str] | None) -> tuple[dict[str, str], list[str]]:
    """Build auth headers from environment variables; returns (headers, secret values to redact).

    Raises ValueError naming the *variable* (never its value) if one is unset, so a misconfigured job fails early.
    """
    headers: dict[str, str] = {}
    secrets: list[str] = []
    wanted = ([("Authorization", auth_env, True)] if auth_env else []) + [
        (h, env, False) for h, env in (header_env or {}).items()]
    for header, env, bearer in wanted:
        value = os.environ.get(env)
        if not value:
            raise ValueError(f"environment variable {env} (for header {header}) is not set")
        if value != value.strip() or any(ord(c) < 32 or ord(c) == 127 for c in value):
            # a pasted token with a trailing newline or a stray \r: HTTP libraries echo such a header back in their
            # error, and the redactor looks for the exact value, so refuse it here naming the variable only
            raise ValueError(f"environment variable {env} (for header {header}) holds whitespace or control "
                             "characters; strip them from the secret")
        headers[header] = f"Bearer {value}" if bearer else value
        secrets.append(value)
    return headers, secrets


class Redactor:
    """Removes secret values from any text before it reaches an error string or a log line."""

    def __init__(self, secrets: Sequence[str]) -> None:
        # as sent, and as a server may echo it back: JSON-escaped (PHP's json_encode also escapes "/" as "\/") or
        # percent-encoded; longest first, so a secret that contains another is removed whole
        forms = {f for s in secrets if s
                 for f in (s, json.dumps(s)[1:-1], json.dumps(s)[1:-1].replace("/", "\\/"), quote(s, safe=""))}
        self._secrets = sorted(forms, key=len, reverse=True)

    @property
    def secrets(self) -> tuple[str, ...]:
        return tuple(self._secrets)

    def __call__(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text


class RemoteBlackBox(BudgetedBlackBox):
    """Base of HTTP-ish clients. Subclasses implement ``_send(x, request_id) -> np.ndarray`` (raw first output),
    raising RetryableError / FatalError; everything else (chunks, threads, budget, retries, stats) lives here."""

    def __init__(self, spec: InputSpec | None = None, *, max_batch_size: int = 64, max_concurrency: int = 4,
                 timeout_s: float = 30.0, retries: int = 4, backoff_s: float = 0.25, max_backoff_s: float = 20.0,
                 max_retry_after_s: float = 60.0, rate_limit_qps: float | None = None,
                 query_budget: int | None = None, secrets: Sequence[str] = (),
                 max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if max_batch_size < 1 or max_concurrency < 1 or retries < 0 or not 0 < timeout_s < math.inf:
            raise ValueError("max_batch_size and max_concurrency must be >= 1, retries >= 0, timeout_s finite > 0")
        if rate_limit_qps is not None and not 0 < rate_limit_qps < math.inf:
            raise ValueError("rate_limit_qps must be finite and > 0, or None for no limit")
        if max_response_bytes < 1:
            raise ValueError("max_response_bytes must be >= 1")
        self.max_response_bytes = int(max_response_bytes)
        self.spec = spec or InputSpec()
        self.max_batch_size = int(max_batch_size)
        self.max_concurrency = int(max_concurrency)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.max_retry_after_s = float(max_retry_after_s)
        super().__init__(query_budget)
        self._rate = RateLimiter(rate_limit_qps) if rate_limit_qps is not None else None
        self._redact = Redactor(secrets)
        self._sleep = sleep
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._req_seq = 0
        # max_concurrency bounds the requests in flight from this client, whoever calls: a chunk sent on the
        # caller's thread counts as much as one sent by the pool, and several callers share one limit
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        # Set while the endpoint refuses whole requests image by image (a deployment fault, below); cleared by any
        # answer. A lone image refused meanwhile cannot be told from the rest, so it is not blamed either.
        self._refusing_all = False

    # -- subclass hooks -------------------------------------------------------------------------------------------
    @abstractmethod
    def _send(self, x: np.ndarray, request_id: str) -> np.ndarray:
        """One attempt: send the model input batch, return the first output as an array."""

    @abstractmethod
    def _target(self) -> str:
        """A secret-free description of where queries go, for messages."""

    def _credentials(self) -> str:
        """Where the credentials come from, for the probe's refusal message (names, never values)."""
        return "the configured credentials"

    def probe(self) -> None:
        x = to_model_input(np.zeros((1, self.spec.channels, self.spec.size, self.spec.size), np.uint8), self.spec)
        retrying = Retrying(stop=stop_after_attempt(self.retries + 1), wait=self._wait,
                            retry=retry_if_exception_type(RetryableError), sleep=self._sleep, reraise=True)
        where = self._target()
        try:
            pred = parse_output(retrying(self._send, x, "probe"), 1)
        except RetryableError as e:
            raise BlackBoxUnavailable(f"{where}: /infer probe failed: {redact_cut(e.reason, self._redact)}"
                                      ) from None
        except FatalError as e:
            if e.status in (401, 403):
                raise BlackBoxUnavailable(f"{where}: the endpoint refused {self._credentials()} (http {e.status})"
                                          ) from None
            raise BlackBoxUnavailable(f"{where}: /infer probe failed: {redact_cut(e.reason, self._redact)}"
                                      ) from None
        except ValueError as e:
            raise BlackBoxUnavailable(f"{where}: /infer answered something unreadable: "
                                      f"{redact_cut(str(e), self._redact)}") from None
        if pred.errors[0] is not None:
            raise BlackBoxUnavailable(f"{where}: /infer answered something unusable: {pred.errors[0]}")

    # -- the rows within the budget: chunks, in parallel up to max_concurrency ------------------------------------
    def _predict_allowed(self, images: np.ndarray) -> list[Prediction]:
        x = to_model_input(images, self.spec)
        chunks = [(i, min(i + self.max_batch_size, len(x))) for i in range(0, len(x), self.max_batch_size)]
        if len(chunks) == 1 or self.max_concurrency == 1:
            return [self._run_chunk(x[a:b]) for a, b in chunks]
        # map keeps input order; at most max_concurrency requests are in flight at once
        return list(self._executor().map(lambda ab: self._run_chunk(x[ab[0]:ab[1]]), chunks))

    # -- public (predict and stats: BudgetedBlackBox) -------------------------------------------------------------
    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(target={self._target()!r}, spec={self.spec}, "
                f"max_batch_size={self.max_batch_size}, max_concurrency={self.max_concurrency})")

    # -- internals ------------------------------------------------------------------------------------------------
    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="blackbox")
            return self._pool

    def _next_id(self) -> str:
        with self._pool_lock:
            self._req_seq += 1
            return str(self._req_seq)

    def _wait(self, state: RetryCallState) -> float:
        # full-jitter exponential backoff; a server's Retry-After is a floor, not a suggestion
        exp = min(self.max_backoff_s, self.backoff_s * (2 ** (state.attempt_number - 1)))
        wait = random.uniform(0, exp)
        exc = state.outcome.exception() if state.outcome else None
        ra = getattr(exc, "retry_after", None)
        return max(wait, ra) if ra is not None else wait

    def _before_sleep(self, state: RetryCallState) -> None:
        self._stats.add(retries=1)
        exc = state.outcome.exception() if state.outcome else None
        log.warning("black box %s: %s, retry %d/%d", self._target(), self._redact(str(getattr(exc, "reason", exc))),
                    state.attempt_number, self.retries)

    def _attempt(self, x: np.ndarray, request_id: str) -> np.ndarray:
        # the slot first: _send starts the request's deadline, so time spent waiting for a slot is never taken for a
        # slow endpoint; the rate limit after it, so that it spaces the moments requests actually go out
        with self._slots:
            if self._rate is not None:
                self._rate.acquire()
            self._stats.add(attempts=1)
            t0 = time.perf_counter()
            try:
                return self._send(x, request_id)
            finally:
                self._stats.latency((time.perf_counter() - t0) * 1000.0)

    def _run_chunk(self, x: np.ndarray, split: bool = False) -> Prediction:
        n = len(x)
        # a half of a refused request asks again for rows already counted: a retry, like a transient failure's
        self._stats.add(**({"retries": 1} if split else {"queries": 1, "images": n}))
        retrying = Retrying(stop=stop_after_attempt(self.retries + 1), wait=self._wait,
                            retry=retry_if_exception_type(RetryableError), before_sleep=self._before_sleep,
                            sleep=self._sleep, reraise=True)
        error: str
        retryable = True
        try:
            out = retrying(self._attempt, x, self._next_id())
            pred = parse_output(out, n)
        except RetryableError as e:
            tries = self.retries + 1
            error = f"{e.reason} after {tries} {'try' if tries == 1 else 'tries'}"
        except FatalError as e:
            if n > 1 and (not e.retryable or e.status == 413 or isinstance(e, ResponseTooLargeError)):
                pred = self._split(x, e, split)
                return pred if split else self._blame_endpoint(pred)
            error, retryable = e.reason, e.retryable or (not split and self._refusing_all)
            if isinstance(e, ResponseTooLargeError):
                error = (f"{e.reason} for a single image: the answer to one image is over the cap, so a smaller "
                         "blackbox.max_batch_size cannot help")
        except ValueError as e:  # parse_output: the model answered, but not with something we can read
            error = f"bad response: {e}"
        except Exception as e:  # noqa: BLE001 - a client bug must not kill a long job; the row records it
            error = f"client error: {type(e).__name__}: {e}"
        else:
            failed = int(pred.failed.sum())
            self._stats.add(ok=n - failed, failures=failed)
            self._refusing_all = False
            return pred
        error = redact_cut(error, self._redact)
        self._stats.add(failures=n)
        return Prediction(np.full(n, -1, np.int64), None, [error] * n, np.full(n, retryable))

    def _blame_endpoint(self, pred: Prediction) -> Prediction:
        """A request whose every image was refused, also each one alone, says nothing against its images: a model
        reloading, an input name or shape changed under the job, a gateway refusing everything. Those rows are the
        endpoint's failure, retried by the next run, not frozen as their own."""
        own = pred.failed & ~pred.retryable
        if not own.any() or not pred.failed.all():  # an answered image shows the endpoint takes such requests
            return pred
        self._refusing_all = True
        log.warning("black box %s refused each of %d images alone as well: taken for the endpoint's fault, not the "
                    "images' (the next run asks again)", self._target(), len(own))
        note = "every image of the request refused, each alone too (the endpoint's fault, retried by the next run)"
        errors = [redact_cut(f"{note}: {e}", self._redact) if e else e for e in pred.errors]
        return Prediction(pred.labels, pred.scores, errors, np.ones(len(own), dtype=bool))

    def _split(self, x: np.ndarray, refusal: FatalError, split: bool) -> Prediction:
        # A refusal answers the whole request, not one row: a body-size or server batch-size limit (413, or a 400
        # saying so) or an answer over our response cap fails every row alike, and one bad image fails its
        # chunk-mates. Halving until the halves pass or a single row is refused keeps the good rows, and leaves the
        # row's own verdict only to a row refused alone.
        if not split:
            log.warning("black box %s refused a request of %d images (%s): resending it in halves; if every "
                        "request is refused, lower blackbox.max_batch_size", self._target(), len(x),
                        self._redact(refusal.reason)[:200])
        half = len(x) // 2
        return Prediction.concat([self._run_chunk(x[:half], True), self._run_chunk(x[half:], True)])
