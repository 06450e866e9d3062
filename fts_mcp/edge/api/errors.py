"""Error answers in OpenAI's shape, `{"error": {message, type, param, code}}`: raised as `ApiError` anywhere under a
handler and written out by the app's exception handler."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import JSONResponse

from fts_mcp.adapters.store import CorruptAdapter, UnknownAdapter
from fts_mcp.edge.api.protocol import ErrorInfo, ErrorResponse
from fts_mcp.edge.engine import DeadlineExceeded
from fts_mcp.errors import FtsError, InvalidArgument


class ApiError(Exception):
    """An error answer: `status`, a message the client can act on, the request field it concerns (`param`) and
    OpenAI's error `kind` (its `type`)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.kind, param=self.param,
                                             code=self.status)).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


async def answer_error(request: Request, exc: ApiError) -> JSONResponse:
    """The app's handler for ApiError."""
    return exc.response()


async def answer_unexpected(request: Request, exc: Exception) -> JSONResponse:
    """The app's last resort: an error no handler expected is still an answer in OpenAI's shape (500), never a bare
    text page; the server logs it with its traceback."""
    return ApiError(500, f"the runtime failed: {type(exc).__name__}", kind="server_error").response()


def failure(exc: FtsError, available: Sequence[str] = (), tenant: bool = False) -> ApiError:
    """The answer to a generation that failed. `available`: what the caller may use, for an unknown model's answer
    (a tenant's own adapters only; the store's own message, which names every adapter, is not passed on to
    tenants)."""
    if isinstance(exc, DeadlineExceeded):
        return ApiError(504, exc.message, param=exc.param, kind=exc.code)
    if isinstance(exc, CorruptAdapter):
        return ApiError(502, exc.message, param="model", kind="corrupt_adapter")
    if isinstance(exc, UnknownAdapter):
        message = "no such model" if tenant else exc.message
        return ApiError(404, f"{message}. Available models: {', '.join(available)}", param="model",
                        kind="model_not_found")
    if isinstance(exc, InvalidArgument):
        return ApiError(400, exc.message, param=exc.param)
    return ApiError(502, exc.message, param=exc.param, kind=exc.code)
