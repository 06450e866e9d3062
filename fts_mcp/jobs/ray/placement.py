"""Whether a Ray job fits the cluster: what it asks for against what the cluster's nodes have, and have free.

Plain values in, a decision and its reason out; no Ray here (`cluster.read_resources` reads the cluster). Every
worker asks for the same bundle: a one-worker job's own process (the Ray job's entrypoint) and each of a
data-parallel job's Ray Train workers take `CPUS_PER_WORKER` CPUs and the job's GPUs per worker on one node; a
data-parallel job's driver takes nothing.

A cluster started by hand (`ray start`) has the nodes it has: a job that none of them could hold, even idle, is
refused before it is submitted, naming the numbers and the fix, instead of waiting forever. A cluster whose
autoscaler adds nodes of configured types may grow into a job, so there only the wait is reported.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

CPUS_PER_WORKER = 1.0
SLACK = 1e-9  # resources are floats (fractional GPUs): 3 x 0.1 GPU fit a node with 0.3


@dataclass(frozen=True)
class Node:
    total: dict[str, float]
    free: dict[str, float]


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[Node, ...]
    fixed: bool
    """True when no autoscaler can add nodes (every node is of Ray's unconfigured type `node_<id>`)."""

    def total(self, name: str) -> float:
        return sum(node.total.get(name, 0.0) for node in self.nodes)

    def free(self, name: str) -> float:
        return sum(node.free.get(name, 0.0) for node in self.nodes)

    def most(self, name: str) -> float:
        """The most of `name` one node has."""
        return max((node.total.get(name, 0.0) for node in self.nodes), default=0.0)


@dataclass(frozen=True)
class Ask:
    workers: int
    gpus: float
    """per worker"""
    cpus: float = CPUS_PER_WORKER

    def describe(self) -> str:
        return f"{self.workers} worker{'s' if self.workers > 1 else ''} x ({self.cpus:g} CPU, {self.gpus:g} GPU)"


class NotReported(ValueError):
    """The cluster's status has no node yet: its head started a moment ago (its monitor reports every few seconds)."""


def from_status(status: dict[str, Any] | None) -> Cluster:
    """The cluster as the dashboard's `/api/cluster_status` reports it (`clusterStatus`: the autoscaler's report,
    what `ray status` prints): per node, each resource as [used, total]. ValueError when it is not that shape,
    NotReported when it lists no node yet."""
    if not status:
        raise NotReported("the cluster has not reported its status yet")
    try:
        by_node = status["loadMetricsReport"]["usageByNode"]
        types = (status.get("autoscalerReport") or {}).get("nodeTypeMapping") or {}
        nodes = tuple(Node(total={name: float(pair[1]) for name, pair in usage.items()},
                           free={name: float(pair[1]) - float(pair[0]) for name, pair in usage.items()})
                      for usage in by_node.values())
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
        raise ValueError(f"an unexpected cluster status ({type(exc).__name__}: {exc})") from None
    if not nodes:
        raise NotReported("the cluster's status lists no node yet")
    # Ray names a node's type `node_<id>` when nobody configured one: a cluster started by hand, which no
    # autoscaler grows. Configured types (a cluster launcher's, KubeRay's worker groups) may get more nodes.
    fixed = bool(types) and set(types) == set(by_node) and all(kind == f"node_{node_id}"
                                                               for node_id, kind in types.items())
    return Cluster(nodes=nodes, fixed=fixed)


def holds(resources: Iterable[dict[str, float]], ask: Ask) -> int:
    """How many of the ask's worker bundles these nodes' resources hold (each bundle on one node)."""
    count = 0
    for node in resources:
        fit = math.floor(node.get("CPU", 0.0) / ask.cpus + SLACK) if ask.cpus > 0 else ask.workers
        if ask.gpus > 0:
            fit = min(fit, math.floor(node.get("GPU", 0.0) / ask.gpus + SLACK))
        count += max(0, fit)
    return count


def choose_gpus(cluster: Cluster | None) -> tuple[float, str]:
    """GPUs per worker when FTS_RAY_GPUS_PER_WORKER is unset: what the cluster has, and why."""
    if cluster is None:
        return 1.0, "1 GPU per worker: FTS_RAY_GPUS_PER_WORKER is unset and the cluster's resources could not be read"
    if cluster.total("GPU") > 0:
        return 1.0, f"1 GPU per worker: FTS_RAY_GPUS_PER_WORKER is unset and the cluster has {cluster.total('GPU'):g}"
    if cluster.fixed:
        return 0.0, "0 GPUs per worker (CPU training): FTS_RAY_GPUS_PER_WORKER is unset and the cluster has no GPU"
    return 1.0, ("1 GPU per worker: FTS_RAY_GPUS_PER_WORKER is unset; the cluster has no GPU now but its autoscaler "
                 "may add GPU nodes (set FTS_RAY_GPUS_PER_WORKER=0 to train on its CPUs)")


def never_fits(ask: Ask, cluster: Cluster) -> tuple[str, str] | None:
    """Why the cluster could not hold the job even with nothing else running, and the setting or argument to
    change; None when it could (or when it may still grow)."""
    if not cluster.fixed:
        return None
    gpus, most_gpus = cluster.total("GPU"), cluster.most("GPU")
    if ask.gpus > 0 and gpus == 0:
        return (f"the cluster has 0 GPUs; this job asks for {ask.gpus:g} per worker: set FTS_RAY_GPUS_PER_WORKER=0 "
                "for a CPU cluster (or leave it unset: each job then asks for what the cluster has)",
                "FTS_RAY_GPUS_PER_WORKER")
    if ask.gpus > most_gpus + SLACK:
        return (f"no node of the cluster has {ask.gpus:g} GPUs (the most on one node is {most_gpus:g}); this job "
                f"asks for {ask.gpus:g} per worker: set FTS_RAY_GPUS_PER_WORKER to {most_gpus:g} or less",
                "FTS_RAY_GPUS_PER_WORKER")
    if ask.cpus > cluster.most("CPU") + SLACK:
        return (f"no node of the cluster offers {ask.cpus:g} CPU to jobs (the most on one node is "
                f"{cluster.most('CPU'):g}; a node started with --num-cpus=0 runs none); each worker asks for "
                f"{ask.cpus:g}: add a node with CPUs", "FTS_RAY_ADDRESS")
    room = holds((node.total for node in cluster.nodes), ask)
    if room < ask.workers:
        has = f"{cluster.total('CPU'):g} CPUs" + (f" and {gpus:g} GPUs" if ask.gpus > 0 else "")
        return (f"the cluster holds at most {room} worker{'s' if room != 1 else ''} of {ask.cpus:g} CPU and "
                f"{ask.gpus:g} GPU (its nodes have {has} in all); this job asks for {ask.workers}: set "
                f"training.workers to {room} or less, or add nodes", "training.workers")
    return None


def free_resources(cluster: Cluster) -> str:
    """The cluster's free CPUs (and GPUs, where it has any) of its total."""
    free = f"{cluster.free('CPU'):g} of {cluster.total('CPU'):g} CPUs"
    if cluster.total("GPU") > 0:
        free += f", {cluster.free('GPU'):g} of {cluster.total('GPU'):g} GPUs"
    return free


def waiting_for(ask: Ask, cluster: Cluster) -> str | None:
    """Why the job cannot be placed right now (other work holds the resources), with the numbers; None when the
    free resources hold it."""
    if holds((node.free for node in cluster.nodes), ask) >= ask.workers:
        return None
    grows = "" if cluster.fixed else "; the cluster's autoscaler may add nodes"
    return (f"resources busy: it asks for {ask.describe()} and {free_resources(cluster)} are free (other work holds "
            f"the rest){grows}")
