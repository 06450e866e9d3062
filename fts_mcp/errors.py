"""Domain errors. Every error an agent or person can act on derives from `FtsError`.

The MCP layer turns them into tool errors; the CLI prints them. Each names the argument at fault (`param`)
and says what would be accepted, in the spirit of the OpenAI job error object `{code, message, param}`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class FtsError(Exception):
    """Base of every error fts-mcp reports to its caller."""

    code = "error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return f"{self.param}: {self.message}" if self.param else self.message


class InvalidArgument(FtsError):
    """An argument has a value that cannot be used; the message says what would be accepted."""

    code = "invalid_argument"


class PathNotAllowed(InvalidArgument):
    """A path argument resolves outside the configured roots."""

    code = "path_not_allowed"


class DatasetInvalid(InvalidArgument):
    """A dataset failed validation; `errors` lists `(line, message)` pairs."""

    code = "invalid_dataset"

    def __init__(self, message: str, errors: list[tuple[int, str]], *, param: str = "dataset") -> None:
        super().__init__(message, param=param)
        self.errors = errors


class JobNotFound(FtsError):
    code = "job_not_found"


class IllegalTransition(FtsError):
    """A job was asked to move between two states the state machine does not connect."""

    code = "illegal_transition"


class ModelUnavailable(FtsError):
    """The base model is neither a local folder nor in the Hugging Face cache of an offline host."""

    code = "model_unavailable"


@contextmanager
def about(param: str, *, instead_of: tuple[str, ...] = ("model", "version")) -> Iterator[None]:
    """Errors from a shared layer (the adapter store names its argument `model`) re-addressed to the argument the
    caller actually has, e.g. `adapters[1].adapter` or `lora_path`."""
    try:
        yield
    except FtsError as exc:
        if exc.param in instead_of:
            exc.param = param
        raise
