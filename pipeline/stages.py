"""The purify stage: the one Ray Data callable class that holds a diffusion model.

One model per GPU, whatever the method: a row's whole decision (its passes, the queries, which rows need another
pass, the vote) happens inside this stage, so the plan holds a single actor pool. The rounds themselves are pure
(`pipeline.purify.cascade`: `Cascade.steps`, `one_pass_steps`); this class only drives them asynchronously. Several
batches are in flight per actor: while one waits for the black-box service, the model works on another, and model
calls go through one thread so that they never run on top of each other. Rows that already carry an error pass
through untouched, so a bad input becomes an error row instead of failing its block.

torch, diffusers and the purifiers are imported inside the actor, not at module level: the driver imports this
module only to hand the class to Ray, and a driver without them stays a few hundred MB lighter.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.blackbox.base import MAX_ERROR_CHARS
from pipeline.cores import CoreShare
from pipeline.decode import is_empty_error
from pipeline.heap import release_freed_memory

if TYPE_CHECKING:
    from pipeline.purify.cascade import Steps

log = logging.getLogger(__name__)
REPORT_EVERY_S = 2.0  # how often an actor tells the service how busy its model was


class ServiceLost(Exception):
    """The job's black-box service (or the actor keeping its query budget) is gone for good."""


class GpuMismatchError(RuntimeError):
    """Ray gave this actor a GPU, but torch cannot use it."""


def check_gpu(device: str, gpu_ids: list[Any]) -> None:
    """Fail instead of purifying on the CPU when Ray reserved a GPU that torch cannot see (typically a CUDA build
    of torch newer than the node's NVIDIA driver). `model.device: cpu` opts out, e.g. on logical test GPUs."""
    import torch

    if not gpu_ids or device == "cpu" or torch.cuda.is_available():
        return
    build = f"torch {torch.__version__} built for CUDA {torch.version.cuda}" if torch.version.cuda else (
        f"torch {torch.__version__}, a CPU-only build")
    raise GpuMismatchError(
        f"Ray gave this purify actor GPU {gpu_ids}, but torch sees no CUDA device ({build}; "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). Run an image whose NVIDIA driver "
        "supports this torch build (see cluster/README.md), or set model.device=cpu to purify on the CPU on purpose")


def _ok_rows(batch: dict[str, np.ndarray]) -> np.ndarray:
    return np.array([is_empty_error(e) for e in batch["error"]], dtype=bool)


class PurifyStage:
    """Purify, query the black-box service, decide: one method, one model, on the actor's device."""

    def __init__(self, model: str, device: str, dtype: str, method: str, params: dict[str, Any], seed: int,
                 service: list[str], namespace: str | None = None, torch_threads: int | None = None) -> None:
        import ray
        import torch

        from pipeline.purify import build_purifier, load_model
        from pipeline.purify.cascade import Cascade, PurifyStep, one_pass_steps
        from pipeline.purify.models import pick_device

        self.device = pick_device(device)
        check_gpu(device, ray.get_gpu_ids() if ray.is_initialized() else [])
        # Ray pins OMP threads to the actor's (fractional) logical CPUs; CPU purification wants its share of the
        # cores, re-read before each model call since purifiers come and go (pipeline.cores).
        self._cores = CoreShare() if self.device == "cpu" and not torch_threads else None
        if self.device == "cpu":
            torch.set_num_threads(torch_threads or self._cores.threads())
        self.model = load_model(model, self.device)
        built = build_purifier(method, self.model, params, dtype=dtype)
        self._torch, self._step_kind, self._one_pass = torch, PurifyStep, one_pass_steps
        self.cascade = built if isinstance(built, Cascade) else None
        self.purifier = built.base if isinstance(built, Cascade) else built
        self.method = method
        self.params_json = json.dumps(built.params(), sort_keys=True)
        self.seed = seed
        found = {}
        for n in service:
            try:
                found[n] = ray.get_actor(n, namespace=namespace)
            except ValueError:  # lost for good: a purifier started later (pool growth, a restart) goes on without it
                log.warning("black-box service actor %s is gone: this purifier queries the others", n)
        # The first actor keeps the query budget's ledger: without it no query may be sent, and every row is left to
        # the next run.
        self._services = [found[n] for n in service if n in found] if service and service[0] in found else []
        self._next_service = itertools.cycle(range(len(self._services)))
        self._unet = ThreadPoolExecutor(1, thread_name_prefix="unet")
        self._name = ray.get_runtime_context().get_actor_id() or f"pid{os.getpid()}"
        self._started = time.monotonic()
        self._unet_s = 0.0
        self._batches = 0
        self._rows = 0
        self._reported = 0.0

    # -- the model, off the event loop -------------------------------------------------------------------------
    def _purify(self, images: np.ndarray, keys: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
        t0 = time.perf_counter()
        if self._cores is not None:
            threads = self._cores.threads()
            if threads != self._torch.get_num_threads():
                log.info("torch threads %d -> %d (CPU purifiers on this machine share its cores)",
                         self._torch.get_num_threads(), threads)
                self._torch.set_num_threads(threads)
        with self._torch.inference_mode():
            res = self.purifier(images, keys, seed)
        out = res.uint8(), res.nfe.numpy()
        self._unet_s += time.perf_counter() - t0
        return out

    async def _drive(self, steps: Steps, images: np.ndarray, keys: list[str]):
        loop = asyncio.get_running_loop()
        answer: Any = None
        while True:
            try:
                step = steps.send(answer)
            except StopIteration as done:
                return done.value
            if isinstance(step, self._step_kind):
                answer = await loop.run_in_executor(self._unet, self._purify, images[step.rows],
                                                    [keys[i] for i in step.rows], step.seed)
            elif not self._services:
                raise ServiceLost("the black-box service is gone")
            else:
                answer = await self._services[next(self._next_service)].predict.remote(step.images)

    def _report(self) -> None:
        now = time.monotonic()
        if now - self._reported >= REPORT_EVERY_S and self._services:
            self._reported = now
            self._services[0].report_purifier.remote(self._name, self._unet_s, now - self._started, self._batches,
                                                     self._rows)

    # -- one batch ---------------------------------------------------------------------------------------------
    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray.exceptions

        n = len(batch["key"])
        images = batch["image"]
        errors = [None if is_empty_error(e) else str(e) for e in batch["error"]]
        retryable = np.zeros(n, bool)
        purified = np.zeros_like(images)
        nfe = np.zeros(n, np.float32)
        pred_orig = np.full(n, -1, np.int64)
        pred_pur = np.full(n, -1, np.int64)
        score_orig = np.full(n, np.nan, np.float32)
        score_pur = np.full(n, np.nan, np.float32)
        flag_score = np.full(n, np.nan, np.float32)
        rows = np.flatnonzero(_ok_rows(batch))
        if rows.size:
            x = np.ascontiguousarray(images[rows])
            keys = [str(k) for k in batch["key"][rows]]
            steps = self.cascade.steps(x, self.seed) if self.cascade else self._one_pass(x, self.seed)
            try:
                d = await self._drive(steps, x, keys)
            except (ValueError, TypeError) as exc:
                # Decode gives every row the model's own shape and type, so this is the configuration, the model or
                # the code, on every row alike: these rows fail, the job goes on, and a rerun after the fix retries
                # them (a row's own bad data ended at decode, as an error row that is not retried).
                for i in rows:
                    errors[i] = f"purify: {exc}"[:MAX_ERROR_CHARS]
                retryable[rows] = True
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ServiceLost) as exc:
                # The service died or is restarting: nothing is wrong with these rows, a later run retries them.
                for i in rows:
                    errors[i] = f"black box: service unavailable ({type(exc).__name__})"
                retryable[rows] = True
            except RuntimeError as exc:
                # torch's own failures (out of memory on a GPU another process filled, a CUDA error): the batch, not
                # its rows; one batch must not fail the job, and a rerun retries them.
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                log.warning("purify failed on a batch of %d rows (%s): they are error rows, retried by the next run",
                            rows.size, first[:MAX_ERROR_CHARS])
                for i in rows:
                    errors[i] = f"purify: {type(exc).__name__}: {first}"[:MAX_ERROR_CHARS]
                retryable[rows] = True
            else:
                purified[rows], nfe[rows] = d.images, d.nfe
                pred_orig[rows], pred_pur[rows] = d.pred_orig, d.labels
                score_orig[rows], score_pur[rows], flag_score[rows] = d.score_orig, d.score_purified, d.flag_score
                for local, i in enumerate(rows):
                    if d.errors[local] is not None:
                        errors[i] = d.errors[local]
                        retryable[i] = bool(d.retryable[local])
        self._batches += 1
        self._rows += n
        self._report()
        release_freed_memory()  # the actor lives for the whole job: keep it at one batch's working set
        failed = np.array([e is not None for e in errors], bool)
        out = dict(batch)
        out.update(purified=purified, nfe=nfe, pred_orig=pred_orig, pred_purified=pred_pur, score_orig=score_orig,
                   score_purified=score_pur, flag_score=flag_score,
                   flagged=(pred_orig != pred_pur) & (pred_orig >= 0) & (pred_pur >= 0) & ~failed,
                   error=np.array(errors, dtype=object), retryable=retryable & failed,
                   method=np.full(n, self.method, dtype=object), params=np.full(n, self.params_json, dtype=object))
        return out
