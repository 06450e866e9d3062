"""Jobs on a Ray cluster (FTS_RUNNER=ray): an adapter beside the local runner, which reaches it lazily.

`runner` is a Ray job's supervisor on the server's host (`python -m fts_mcp.jobs.ray.runner JOB_ID`), `cluster` its
Jobs API client, `entry` what runs on the cluster (`python -m fts_mcp.jobs.ray.entry`), and `frames` the wire
between them: the Ray job's log. This package imports nothing, so importing it never imports Ray; its modules
import Ray itself only where they talk to a cluster.
"""
