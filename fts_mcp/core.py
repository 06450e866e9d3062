"""The typed core the MCP tools and the CLI both call. Never imports `mcp` (nor torch).

One `Core` per process: the settings, and one service per concern, each in its own package:

    core.jobs       fts_mcp.jobs.service       submit (the one path for every kind), status, list, cancel, resume
    core.training   fts_mcp.training.service   validate_dataset, start a training job
    core.merging    fts_mcp.adapters.service   merge and combine adapters
    core.evaluating fts_mcp.adapters.service   adapter (or merged model) against its base on held-out data
    core.edge       fts_mcp.edge.service       deploy to the store, list it, generate
    core.planning   fts_mcp.planning.service   fine-tune or RAG, resource estimates

Arguments are checked there; bad ones raise `FtsError` subclasses naming the argument and what would be accepted.
"""

from __future__ import annotations

from fts_mcp.adapters.service import Evaluating, Merging
from fts_mcp.config import Settings
from fts_mcp.edge.service import Edge
from fts_mcp.errors import FtsError
from fts_mcp.jobs.service import Jobs
from fts_mcp.planning.service import Planning
from fts_mcp.training.service import Training


class Core:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.jobs = Jobs(self.settings)
        self.training = Training(self.settings, self.jobs)
        self.merging = Merging(self.settings, self.jobs)
        self.evaluating = Evaluating(self.settings, self.jobs)
        self.edge = Edge(self.settings, self.jobs)
        self.planning = Planning(self.settings)

    def close(self) -> None:
        self.jobs.close()

    def __enter__(self) -> Core:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Unavailable:
    """The core of a server whose job store cannot be opened (an unreadable database, a bad setting): what needs no
    store (planning, the model list) still answers; everything else answers with `error`, its reason and fix."""

    def __init__(self, error: FtsError, settings: Settings | None) -> None:
        self.error = error
        self.settings = settings
        self.planning = Planning(settings) if settings else None

    def close(self) -> None:
        pass


def open_core() -> Core | Unavailable:
    """The process's core, or what is left of it when the settings or the job store cannot be opened."""
    try:
        settings = Settings.from_env()
    except FtsError as exc:
        return Unavailable(exc, None)
    try:
        return Core(settings)
    except FtsError as exc:
        return Unavailable(exc, settings)
