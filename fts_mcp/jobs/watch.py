"""The long-poll loop, shared by the `job_status` tool, `generate` and `fts-mcp jobs logs --follow`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from fts_mcp.jobs.records import Job

POLL_SECONDS = 0.25


async def watch(read: Callable[[], Job], *, wait_seconds: float,
                on_poll: Callable[[Job], Awaitable[None]] | None = None, until_terminal: bool = False,
                poll_seconds: float = POLL_SECONDS) -> Job:
    """Read the job (in a thread: the store is blocking) until its state changes (or, with `until_terminal`,
    until it ends) or `wait_seconds` pass; `on_poll` sees every read. A terminal job, or a wait of 0, answers at
    once."""
    job = await anyio.to_thread.run_sync(read)
    start = job.state
    deadline = anyio.current_time() + wait_seconds
    while True:
        if on_poll is not None:
            await on_poll(job)
        changed = job.state.terminal if until_terminal else job.state != start
        remaining = deadline - anyio.current_time()
        if changed or job.state.terminal or remaining <= 0:
            return job
        await anyio.sleep(min(poll_seconds, remaining))
        job = await anyio.to_thread.run_sync(read)
