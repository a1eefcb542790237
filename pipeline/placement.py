"""What a sanitize plan asks the cluster for, and whether the cluster can ever give it.

The plan holds one purify actor pool (each actor: one diffusion model, one GPU when the cluster has GPUs) and the
black-box service (a few CPU actors shared by every purifier). Ray Data waits silently for resources it cannot get,
so the job checks here, before any work, that every actor fits somewhere: on the nodes alive now, or on the node
types an autoscaler may still add.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipeline.config import JobConfig


class PlacementError(RuntimeError):
    """The plan asks for more than the cluster has and can ever get."""


@dataclass(frozen=True)
class PlanDemand:
    purifiers: int  # the purify pool's upper bound: one diffusion model per actor, whatever the method
    gpus_per_purifier: float
    cpus_per_purifier: float
    blackbox_actors: int
    cpus_per_blackbox: float

    @property
    def gpus(self) -> float:
        return self.purifiers * self.gpus_per_purifier

    def describe(self) -> str:
        return (f"{self.purifiers} purify actor(s) x ({self.gpus_per_purifier:g} GPU, {self.cpus_per_purifier:g} CPU)"
                f" + {self.blackbox_actors} black-box actor(s) x {self.cpus_per_blackbox:g} CPU")


SMALL_CLUSTER_CPUS = 4  # below this, a GPU purifier reserves no CPU: Ray Data's own tasks need the few there are


def plan_demand(cfg: JobConfig, cluster_has_gpus: bool, cluster_cpus: float | None = None,
                cpu_free_node: bool = False) -> PlanDemand:
    """The actors a job config asks for; `cluster_has_gpus` decides what `gpus_per_actor: null` means, and
    `cluster_cpus` (the cluster's logical CPUs, None: plenty) what `purify_cpus: null` means for a GPU purifier.
    `cpu_free_node`: a node offers no CPU (a head kept free of work), where an actor that reserves nothing could
    land: a CPU purifier then reserves a CPU by default."""
    r = cfg.resources
    gpus = r.gpus_per_actor if r.gpus_per_actor is not None else (1.0 if cluster_has_gpus else 0.0)
    roomy = cluster_cpus is None or cluster_cpus >= SMALL_CLUSTER_CPUS
    cpus = r.purify_cpus if r.purify_cpus is not None else (1.0 if (gpus > 0 and roomy) or (gpus == 0 and cpu_free_node)
                                                           else 0.0)
    return PlanDemand(purifiers=r.max_purify_actors or r.purify_actors, gpus_per_purifier=gpus,
                      cpus_per_purifier=cpus, blackbox_actors=r.query_actors, cpus_per_blackbox=r.query_cpus)


def check_placement(demand: PlanDemand, nodes: Sequence[Mapping[str, float]],
                    can_add: Sequence[tuple[Mapping[str, float], int]] = (), min_purifiers: int = 1,
                    task_cpus: float = 1.0, largest_task: float = 1.0) -> None:
    """Raise PlacementError unless `min_purifiers` purify actors and every black-box actor fit on `nodes` (each a
    node's total resources) plus `can_add` (node shapes an autoscaler may still start, with how many of each), with
    `task_cpus` logical CPUs left for Ray Data's own operators (reading, writing, the resume filter: 1 CPU each) and
    one node with `largest_task` CPUs left (the largest task: a decode task asks for `resources.decode_cpus`).

    First-fit, largest nodes first: enough for actors of one or two shapes."""
    free = [dict(n) for n in nodes]
    for shape, count in can_add:
        free += [dict(shape) for _ in range(max(0, count))]

    def place(gpu: float, cpu: float) -> bool:
        for n in sorted(free, key=lambda n: (-n.get("GPU", 0.0), -n.get("CPU", 0.0))):
            if n.get("GPU", 0.0) + 1e-9 >= gpu and n.get("CPU", 0.0) + 1e-9 >= cpu:
                n["GPU"] = n.get("GPU", 0.0) - gpu
                n["CPU"] = n.get("CPU", 0.0) - cpu
                return True
        return False

    placed = 0
    for _ in range(demand.purifiers):
        if not place(demand.gpus_per_purifier, demand.cpus_per_purifier):
            break
        placed += 1
    missing: list[str] = []
    if placed < min_purifiers:
        total_gpus = sum(n.get("GPU", 0.0) for n in nodes) + sum(s.get("GPU", 0.0) * c for s, c in can_add)
        missing.append(
            f"{min_purifiers} purify actor(s) of {demand.gpus_per_purifier:g} GPU + {demand.cpus_per_purifier:g} CPU "
            f"each, but only {placed} fit (the cluster has or can add {total_gpus:g} GPU in all): lower "
            f"resources.purify_actors, or resources.gpus_per_actor (one diffusion model needs at most one GPU)")
    for i in range(demand.blackbox_actors):
        if not place(0.0, demand.cpus_per_blackbox):
            missing.append(f"black-box actor {i + 1} of {demand.blackbox_actors} ({demand.cpus_per_blackbox:g} CPU) "
                           "does not fit on any node: lower resources.query_actors or resources.query_cpus")
            break
    # Each of those tasks takes a whole CPU on one node: half a CPU left on each of two nodes runs none of them.
    left = sum(math.floor(max(0.0, n.get("CPU", 0.0)) + 1e-9) for n in free)
    if not missing and left + 1e-9 < task_cpus:
        missing.append(f"{task_cpus:g} CPU(s) for Ray Data's read / write / resume tasks, but the actors leave "
                       f"{left:g} whole CPU(s) on the nodes: lower resources.purify_cpus or resources.query_cpus, or "
                       "add CPUs")
    most = max((n.get("CPU", 0.0) for n in free), default=0.0)
    if not missing and most + 1e-9 < largest_task:
        missing.append(f"a task of {largest_task:g} CPU(s) (resources.decode_cpus), but no node has that many left "
                       f"once the actors are placed (at most {most:g}): lower resources.decode_cpus")
    if missing:
        raise PlacementError("this plan can never be placed on the cluster: " + "; ".join(missing))
