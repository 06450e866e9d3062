"""Whether a job fits a Ray cluster, from tables (no cluster needed; the real one is read in test_cluster.py).

A job no node could ever hold is refused with the numbers and the setting to change; a job that fits but finds
the resources taken says so; with FTS_RAY_GPUS_PER_WORKER unset a CPU cluster gets CPU jobs."""

import pytest

from fts_mcp.jobs.ray.placement import Ask, Cluster, Node, choose_gpus, from_status, holds, never_fits, waiting_for


def node(cpu: float, gpu: float = 0.0, *, used_cpu: float = 0.0, used_gpu: float = 0.0) -> Node:
    total = {"CPU": cpu, **({"GPU": gpu} if gpu else {})}
    return Node(total=total, free={"CPU": cpu - used_cpu, **({"GPU": gpu - used_gpu} if gpu else {})})


CPU_HEAD = Cluster(nodes=(node(4),), fixed=True)
GPU_PAIR = Cluster(nodes=(node(8, 1), node(8, 1)), fixed=True)
GROWING = Cluster(nodes=(node(4),), fixed=False)  # an autoscaler may add (GPU) nodes


# What Ray 2.60's dashboard answered for a `ray start --head --num-cpus=4` (its `clusterStatus`, trimmed).
STARTED_BY_HAND = {
    "autoscalerReport": {"nodeTypeMapping": {"bcead5a7": "node_bcead5a7"}, "legacy": True},
    "loadMetricsReport": {
        "usage": {"CPU": [1.0, 4.0], "memory": [0.0, 14987705959.0]},
        "usageByNode": {"bcead5a7": {"node:InternalHead": [0.0, 1.0], "CPU": [1.0, 4.0],
                                     "memory": [0.0, 14987705959.0]}},
    },
}


def test_the_dashboards_cluster_status_is_read_per_node_and_a_cluster_started_by_hand_is_fixed():
    cluster = from_status(STARTED_BY_HAND)
    assert cluster.fixed and cluster.total("CPU") == 4 and cluster.free("CPU") == 3 and cluster.total("GPU") == 0
    launched = {**STARTED_BY_HAND, "autoscalerReport": {"nodeTypeMapping": {"bcead5a7": "gpu-workers"}}}
    assert not from_status(launched).fixed  # a configured node type: its autoscaler may add nodes
    assert not from_status({"loadMetricsReport": STARTED_BY_HAND["loadMetricsReport"]}).fixed  # unknown: may grow
    for broken in ({}, {"loadMetricsReport": {"usageByNode": {}}}, {"loadMetricsReport": {"usageByNode": {"x": 1}}}):
        with pytest.raises(ValueError):
            from_status(broken)


@pytest.mark.parametrize(("ask", "cluster", "says", "param"), [
    (Ask(1, 1.0), CPU_HEAD, "the cluster has 0 GPUs; this job asks for 1 per worker: set FTS_RAY_GPUS_PER_WORKER=0",
     "FTS_RAY_GPUS_PER_WORKER"),
    (Ask(2, 2.0), GPU_PAIR, "no node of the cluster has 2 GPUs (the most on one node is 1)", "FTS_RAY_GPUS_PER_WORKER"),
    (Ask(3, 1.0), GPU_PAIR, "holds at most 2 workers of 1 CPU and 1 GPU (its nodes have 16 CPUs and 2 GPUs in all); "
     "this job asks for 3: set training.workers to 2 or less", "training.workers"),
    (Ask(5, 0.0), CPU_HEAD, "holds at most 4 workers", "training.workers"),
    (Ask(1, 0.0), Cluster(nodes=(node(0),), fixed=True), "no node of the cluster offers 1 CPU", "FTS_RAY_ADDRESS"),
])
def test_a_job_no_node_could_ever_hold_is_refused_naming_the_numbers_and_the_fix(ask, cluster, says, param):
    refused = never_fits(ask, cluster)
    assert refused is not None and says in refused[0] and refused[1] == param


@pytest.mark.parametrize(("ask", "cluster"), [
    (Ask(1, 0.0), CPU_HEAD),
    (Ask(4, 0.0), CPU_HEAD),
    (Ask(2, 1.0), GPU_PAIR),  # one per node
    (Ask(4, 0.5), GPU_PAIR),  # fractional GPUs share a device
    (Ask(8, 1.0), GROWING),  # may fit once the autoscaler adds nodes: waited for, not refused
])
def test_a_job_that_fits_or_may_fit_is_not_refused(ask, cluster):
    assert never_fits(ask, cluster) is None


def test_fractional_gpus_are_counted_without_float_error():
    assert holds([{"CPU": 8.0, "GPU": 0.3}], Ask(3, 0.1)) == 3


def test_a_job_that_fits_but_finds_the_resources_taken_says_what_is_free():
    busy = Cluster(nodes=(node(4, used_cpu=4),), fixed=True)
    assert waiting_for(Ask(1, 0.0), busy) == ("resources busy: it asks for 1 worker x (1 CPU, 0 GPU) and 0 of 4 CPUs "
                                              "are free (other work holds the rest)")
    half = Cluster(nodes=(node(8, 1, used_gpu=1), node(8, 1)), fixed=False)
    said = waiting_for(Ask(2, 1.0), half)
    assert "16 of 16 CPUs, 1 of 2 GPUs are free" in said and "may add nodes" in said
    assert waiting_for(Ask(1, 1.0), half) is None and waiting_for(Ask(4, 0.0), CPU_HEAD) is None


@pytest.mark.parametrize(("cluster", "gpus", "says"), [
    (CPU_HEAD, 0.0, "the cluster has no GPU"),
    (GPU_PAIR, 1.0, "the cluster has 2"),
    (GROWING, 1.0, "may add GPU nodes (set FTS_RAY_GPUS_PER_WORKER=0 to train on its CPUs)"),
    (None, 1.0, "could not be read"),
])
def test_unset_gpus_per_worker_are_chosen_from_the_cluster(cluster, gpus, says):
    chosen, why = choose_gpus(cluster)
    assert chosen == gpus and says in why and "FTS_RAY_GPUS_PER_WORKER is unset" in why
