"""Local ONNX model queried through onnxruntime (CPU provider): ``onnx:path/model.onnx``.

Still a black box to the defense: only the first output is read, exactly as for a remote endpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from .base import (
    MAX_ERROR_CHARS,
    BlackBoxUnavailable,
    BudgetedBlackBox,
    InputSpec,
    Prediction,
    parse_output,
    to_model_input,
)

log = logging.getLogger(__name__)

# Options of the remote clients that mean nothing for a local file: accepted so that one config can point at either.
REMOTE_ONLY = frozenset({"max_concurrency", "timeout_s", "retries", "backoff_s", "max_backoff_s", "max_retry_after_s",
                         "rate_limit_qps", "auth_env", "header_env", "verify", "check_timeout_s",
                         "max_response_bytes"})


class OnnxBlackBox(BudgetedBlackBox):
    def __init__(self, path: str | Path, spec: InputSpec | None = None, *, max_batch_size: int = 512,
                 query_budget: int | None = None, threads: int | None = None, **remote_options: object) -> None:
        unknown = set(remote_options) - REMOTE_ONLY
        if unknown:
            raise TypeError(f"unknown option(s) for an onnx: black box: {', '.join(sorted(unknown))}")
        if remote_options:
            log.debug("onnx black box ignores remote-only options %s", sorted(remote_options))
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.path = Path(path)
        self.spec = spec or InputSpec()
        self.max_batch_size = int(max_batch_size)
        self.threads = threads
        self._session = None
        self._input_name: str | None = None
        self._load_lock = threading.Lock()
        super().__init__(query_budget)

    def _load(self):  # noqa: ANN202 - onnxruntime.InferenceSession, imported lazily
        with self._load_lock:
            return self._load_locked()

    def _load_locked(self):  # noqa: ANN202
        if self._session is None:
            import onnxruntime as ort

            if not self.path.is_file():
                raise BlackBoxUnavailable(f"ONNX model file not found: {self.path}")
            opts = ort.SessionOptions()
            if self.threads:
                # Ray actors share a node: an explicit thread count keeps them from oversubscribing the cores
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
            try:
                sess = ort.InferenceSession(str(self.path), sess_options=opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own non-public exception types
                raise BlackBoxUnavailable(f"cannot load ONNX model {self.path}: {str(e)[:300]}") from None
            names = [i.name for i in sess.get_inputs()]
            if self.spec.input_name in names:
                self._input_name = self.spec.input_name
            elif len(names) == 1:
                # a local file has no ambiguity: its only input is the image, whatever the config calls it
                self._input_name = names[0]
            else:
                raise BlackBoxUnavailable(f"{self.path}: input {self.spec.input_name!r} not among {names}")
            self._session = sess
        return self._session

    def check(self) -> None:
        self._load()

    def probe(self) -> None:
        sess = self._load()
        x = to_model_input(np.zeros((1, self.spec.channels, self.spec.size, self.spec.size), np.uint8), self.spec)
        try:
            pred = parse_output(sess.run(None, {self._input_name: x})[0], 1)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own non-public exception types
            raise BlackBoxUnavailable(f"{self.path}: one-image probe failed: {str(e)[:MAX_ERROR_CHARS]}") from None
        if pred.errors[0] is not None:
            raise BlackBoxUnavailable(f"{self.path}: one-image probe answered something unusable: {pred.errors[0]}")

    def _predict_allowed(self, images: np.ndarray) -> list[Prediction]:
        n = len(images)
        try:
            sess = self._load()
        except BlackBoxUnavailable as e:
            self._stats.add(failures=n, images=n)
            return [Prediction(np.full(n, -1, np.int64), None, [str(e)[:300]] * n)]
        parts = []
        for a in range(0, n, self.max_batch_size):
            x = to_model_input(images[a:a + self.max_batch_size], self.spec)
            m = len(x)
            self._stats.add(queries=1, attempts=1, images=m)
            t0 = time.perf_counter()
            try:
                out = sess.run(None, {self._input_name: x})[0]
                pred = parse_output(out, m)
            except Exception as e:  # noqa: BLE001 - per-request failure: record it on the rows, keep going
                self._stats.add(failures=m)
                parts.append(Prediction(np.full(m, -1, np.int64), None,
                                        [f"onnxruntime: {str(e)}"[:MAX_ERROR_CHARS]] * m))
            else:
                failed = int(pred.failed.sum())
                self._stats.add(ok=m - failed, failures=failed)
                parts.append(pred)
            finally:
                self._stats.latency((time.perf_counter() - t0) * 1000.0)
        return parts

    def close(self) -> None:
        self._session = None

    def __repr__(self) -> str:
        return f"OnnxBlackBox(path={str(self.path)!r}, spec={self.spec})"
