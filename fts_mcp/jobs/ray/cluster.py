"""Talking to a Ray cluster through its Jobs API: the client, calls that cannot hang, what the cluster has, stopping
a job.

Ray itself is imported here only when a client is made (`connect`): the server checks it is installed
(`require_ray`) without loading it, and the local runner stops an abandoned Ray job (`stop_abandoned`) through this
module alone. Nothing here joins the cluster (`ray.init`): every call is an HTTP request to the head's dashboard.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from typing import Any

from fts_mcp.config import Settings
from fts_mcp.errors import FtsError
from fts_mcp.jobs.ray.placement import Cluster, NotReported, from_status

log = logging.getLogger(__name__)
CALL_SECONDS = 30.0  # Ray's client sets no timeout of its own


class RayUnavailable(FtsError):
    code = "ray_unavailable"


def require_ray() -> None:
    """FTS_RUNNER=ray needs Ray's job-submission client in the server's environment."""
    if importlib.util.find_spec("ray") is None:
        raise RayUnavailable("FTS_RUNNER=ray needs Ray: pip install 'fts-mcp[ray]' (or unset FTS_RUNNER to run jobs "
                             "on this host)", param="FTS_RUNNER")


def connect(settings: Settings):
    """A Jobs API client for the cluster at FTS_RAY_ADDRESS, with RAY_AUTH_TOKEN as its bearer token if set."""
    require_ray()
    from ray.job_submission import JobSubmissionClient

    token = settings.env.get("RAY_AUTH_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(settings.ray_address, headers=headers)


def read_resources(client, *, wait: float = 15.0) -> Cluster:
    """What the cluster's nodes have and have free, from the dashboard's cluster status (what `ray status` prints),
    asked with the Jobs API client's own address, token and TLS settings. A head that has just started has not
    reported yet: asked again for up to `wait` seconds. ValueError when the answer cannot be read."""
    deadline = time.monotonic() + wait
    while True:
        # the client's own request path (its address, headers, cookies, TLS); Ray has no public call for this
        response = client._do_request("GET", "/api/cluster_status", timeout=CALL_SECONDS)
        if response.status_code != 200:
            raise ValueError(f"the dashboard answered {response.status_code} for its cluster status")
        try:
            status = response.json()["data"]["clusterStatus"]
        except (ValueError, KeyError, TypeError):
            raise ValueError("the dashboard's cluster status is not the JSON Ray sends") from None
        try:
            return from_status(status)
        except NotReported:
            if time.monotonic() > deadline:
                raise
        time.sleep(1.0)


def bounded(call, *args, timeout: float = CALL_SECONDS):
    """`call(*args)` in a daemon thread, given up after `timeout` (TimeoutError): a cluster that stops answering
    must not hang the supervisor, or a server's tick."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, call(*args)))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome.append((False, exc))

    thread = threading.Thread(target=run, daemon=True, name="ray-call")
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise TimeoutError(f"the Ray cluster did not answer within {timeout:.0f}s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def try_stop(client, sid: str) -> bool:
    """Ask Ray to stop the job; whether it took the request."""
    try:
        bounded(client.stop_job, sid)
        return True
    except Exception as exc:  # noqa: BLE001 - best effort: it may have ended, or the cluster may be gone
        log.warning("could not stop Ray job %s: %s", sid, exc)
        return False


def stop_abandoned(settings: Settings, submission_id: str) -> None:
    """Stop a Ray job nobody follows any more (its supervisor died): its work could not come back."""
    try:
        bounded(lambda: connect(settings).stop_job(submission_id))
    except Exception as exc:  # noqa: BLE001 - best effort: the cluster may be gone too
        log.warning("could not stop abandoned Ray job %s: %s", submission_id, exc)
