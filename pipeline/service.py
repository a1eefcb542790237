"""The black box as one service for the whole job: a few Ray actors that own the client, shared by every purifier.

An endpoint's owner counts queries, rate and concurrency for the whole job, so that is where the limits live: the
query budget is reserved through one ledger (the service's first actor), and the rate limit and the concurrency
bound are split over the service's actors so that their sum is the configured total. Purifiers call
`predict.remote(images)` on any actor; images arrive at the model's size and are fitted to the black box's here.
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import Any

import numpy as np
from PIL import Image

from pipeline.blackbox import InputSpec, Prediction, open_blackbox
from pipeline.blackbox.base import QueryBudget, budget_refusal

log = logging.getLogger(__name__)


def fit_to_spec(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Resize / convert channels so that a model-sized uint8 batch matches what the black box takes (antialiased
    bilinear, as PIL does it; numpy and PIL only, so the service needs no torch)."""
    n, c, h, w = images.shape
    if (c, h, w) == (spec.channels, spec.size, spec.size):
        return images
    x = images.astype(np.float32)
    if c != spec.channels:
        x = x.mean(1, keepdims=True) if spec.channels == 1 else np.repeat(x, spec.channels, axis=1)
    if (h, w) != (spec.size, spec.size):
        x = np.stack([np.stack([np.asarray(Image.fromarray(ch, mode="F").resize((spec.size, spec.size),
                                                                               Image.Resampling.BILINEAR))
                                for ch in img]) for img in x])
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def split_limits(options: dict[str, Any], actors: int) -> tuple[dict[str, Any], int | None]:
    """Per-actor client options whose rate and concurrency add up to the job's totals, and the job's budget (which
    the ledger keeps: a budget split per actor would refuse rows while another actor still had some left)."""
    opts = dict(options)
    budget = opts.pop("query_budget", None)
    if opts.get("rate_limit_qps"):
        opts["rate_limit_qps"] = float(opts["rate_limit_qps"]) / actors
    if "max_concurrency" in opts:
        opts["max_concurrency"] = max(1, int(opts["max_concurrency"]) // actors)
    return opts, budget


class BlackBoxService:
    """One actor of the service. Actor 0 is also the ledger of the job's query budget."""

    def __init__(self, uri: str, spec: dict[str, Any], options: dict[str, Any], budget: int | None,
                 ledger: str | None, namespace: str | None = None) -> None:
        self.spec = InputSpec(**spec)
        self.bb = open_blackbox(uri, self.spec, **options)
        self._budget = QueryBudget(budget) if ledger is None else None
        self._ledger_name, self._namespace = ledger, namespace
        self._ledger = None
        self.refused = 0
        self._purifiers: dict[str, tuple[float, float, int, int]] = {}

    # -- the ledger (actor 0) ----------------------------------------------------------------------------------
    def reserve(self, n: int) -> int:
        """How many of the next n images the job's budget still allows (and takes them)."""
        assert self._budget is not None, "reserve() is the ledger's: call it on the service's first actor"
        return self._budget.reserve(n)

    def _reserve(self, n: int) -> int:
        if self._budget is not None:
            return self._budget.reserve(n)
        import ray

        if self._ledger is None:
            self._ledger = ray.get_actor(self._ledger_name, namespace=self._namespace)
        return ray.get(self._ledger.reserve.remote(n))

    # -- queries -----------------------------------------------------------------------------------------------
    def predict(self, images: np.ndarray) -> Prediction:
        """Labels for model-sized uint8 images; rows past the job's budget are refused (retryable) failures."""
        n = len(images)
        allowed = self._reserve(n) if n else 0
        parts = [self.bb.predict(fit_to_spec(images[:allowed], self.spec))] if allowed else []
        if allowed < n:
            self.refused += n - allowed
            parts.append(budget_refusal(n - allowed))
        return Prediction.concat(parts)

    def stats(self) -> dict[str, Any]:
        d = dict(self.bb.stats())
        d["budget_rejected"] = d.get("budget_rejected", 0) + self.refused
        if self._budget is not None:
            d["budget_left"] = self._budget.left
        return d

    def ready(self) -> bool:
        return True

    # -- purifier telemetry (actor 0): how busy the diffusion model was ------------------------------------------
    def report_purifier(self, actor: str, unet_s: float, wall_s: float, batches: int, rows: int) -> None:
        self._purifiers[actor] = (unet_s, wall_s, batches, rows)

    def purifier_stats(self) -> dict[str, float]:
        unet = sum(v[0] for v in self._purifiers.values())
        wall = sum(v[1] for v in self._purifiers.values())
        return {"purifiers": len(self._purifiers), "unet_s": unet, "purifier_wall_s": wall,
                "unet_share": unet / wall if wall > 0 else 0.0,
                "batches": sum(v[2] for v in self._purifiers.values()),
                "rows": sum(v[3] for v in self._purifiers.values())}


class ServiceHandle:
    """The driver's view of the service: actor names (small, so purify actors can be restarted with them), the
    actors themselves, and the job-wide stats."""

    def __init__(self, names: list[str], namespace: str | None, actors: list[Any]) -> None:
        self.names, self.namespace, self.actors = names, namespace, actors

    def stats(self) -> dict[str, Any]:
        """Totals over the actors that can still say; an actor lost for good (the budget's ledger is never
        restarted) leaves its counts out, with a warning, instead of failing a job whose rows are written."""
        import ray

        def ask(call: Any) -> dict[str, Any] | None:
            try:
                return ray.get(call, timeout=60)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                log.warning("a black-box service actor could not report its counts (%s): the summary leaves "
                            "them out", type(e).__name__)
                return None

        parts = [ask(a.stats.remote()) for a in self.actors]
        keys = ("rows", "images", "queries", "attempts", "retries", "ok", "failures", "budget_rejected")
        total: dict[str, Any] = {k: sum(int(p.get(k, 0) or 0) for p in parts if p) for k in keys}
        total["budget_left"] = parts[0].get("budget_left") if parts[0] else None
        purifiers = ask(self.actors[0].purifier_stats.remote()) or {}
        total.update({f"purifier_{k}" if k == "rows" else k: v for k, v in purifiers.items()})
        return total

    def rows_decided(self) -> int:
        """Rows the purify actors have finished so far (as they last reported)."""
        import ray

        return int(ray.get(self.actors[0].purifier_stats.remote(), timeout=10)["rows"])

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


def start_service(uri: str, spec: dict[str, Any], options: dict[str, Any], actors: int, cpus: float,
                  max_concurrency: int) -> ServiceHandle:
    """Start the job's black-box service: `actors` Ray actors of `cpus` logical CPUs each, each with enough threads
    for its share of the concurrency. With 0 CPUs an actor could land anywhere, the head included: it is steered
    (softly, so a restart may go elsewhere) to the node with the most CPUs, where the job's work runs."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    per_actor, budget = split_limits(options, actors)
    run = uuid.uuid4().hex[:8]
    names = [f"bbpurify-blackbox-{run}-{i}" for i in range(actors)]
    namespace = ray.get_runtime_context().namespace
    # The ledger is called from the other actors' threads as well as from purifiers: give it room for both.
    threads = max(4, math.ceil(max_concurrency / actors) * 2 + actors)
    cls = ray.remote(BlackBoxService)
    placement: dict[str, Any] = {}
    if cpus == 0:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        best = max(nodes, key=lambda n: n["Resources"].get("CPU", 0.0))
        placement["scheduling_strategy"] = NodeAffinitySchedulingStrategy(best["NodeID"], soft=True)
    handles = []
    for i, name in enumerate(names):
        # A restarted ledger would forget what the budget already spent: with a budget, it is not restarted.
        restarts = 0 if i == 0 and budget is not None else -1
        handles.append(cls.options(name=name, num_cpus=cpus, max_concurrency=threads, max_restarts=restarts,
                                   max_task_retries=0, **placement).remote(
            uri, spec, per_actor, budget if i == 0 else None, None if i == 0 else names[0], namespace))
    ray.get([h.ready.remote() for h in handles])
    return ServiceHandle(names, namespace, handles)
