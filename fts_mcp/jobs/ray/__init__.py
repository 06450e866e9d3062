"""Jobs on a Ray cluster (FTS_RUNNER=ray): an adapter beside the local runner, which reaches it lazily.

`runner` is a Ray job's supervisor on the server's host (`python -m fts_mcp.jobs.ray.runner JOB_ID`), `cluster` its
Jobs API client, `placement` whether a job fits the cluster, `entry` what the cluster runs (`python -m
fts_mcp.jobs.ray.entry`: it checks the cluster's Python, then runs the job with `node`), and `frames` the wire
between them: the Ray job's log. This package imports nothing, so importing it never imports Ray; its modules
import Ray itself only where they talk to a cluster.
"""
