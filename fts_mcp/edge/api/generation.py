"""A completion or chat request through the engine: admitted to the queue, queued as one ticket per choice
(prompts x n), then answered whole or streamed as server-sent events (`data: [DONE]` last). However it ends —
answered, failed, past its deadline, or its client gone — its tickets are cancelled and its queue places given
back. Its model is resolved on the store's threads (`RuntimeState.resolve`); the base needs none."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from fts_mcp.edge.api.access import state_of
from fts_mcp.edge.api.errors import ApiError
from fts_mcp.edge.api.protocol import (
    AdapterInfo,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessage,
    ChatRequest,
    ChatRoleChoice,
    ChatStreamChoice,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from fts_mcp.edge.engine import DeadlineExceeded, Engine, Ticket
from fts_mcp.edge.tenants import Key
from fts_mcp.errors import FtsError

DISCONNECT_POLL_SECONDS = 0.1


class Choices:
    """The tickets of one request (prompts x n) and what each has sent so far, for answers and stream chunks."""

    def __init__(self, tickets: list[Ticket], engine: Engine, stops: list[str], n: int,
                 warning: str | None = None) -> None:
        self.tickets, self.engine, self.n = tickets, engine, n  # prompts x n tickets, prompt-major
        self.warning = warning  # the model's base warning (`Engine.base_warning`), read with its resolution
        self.hold = max((len(s) for s in stops), default=1) - 1  # characters that might start a stop sequence
        self.sent = [""] * len(tickets)  # text sent so far
        self.seen = [0] * len(tickets)  # tokens turned into text so far
        self.text = [""] * len(tickets)  # their text, decoded incrementally (as transformers' streamers do)
        self.offsets = [(0, 0)] * len(tickets)  # (prefix, read) token offsets of that decoding
        self.closed = [False] * len(tickets)
        self.event: asyncio.Event | None = None  # set by the scheduler whenever a ticket changes

    def cancel(self) -> None:
        for ticket in self.tickets:
            ticket.cancel.set()

    @property
    def done(self) -> bool:
        return all(t.done for t in self.tickets)

    def deltas(self) -> list[tuple[int, str, str | None]]:
        """(index, new text, finish reason when it just finished): a delta per new token of each choice (as
        OpenAI streams), then its last piece of text with the finish reason."""
        out = []
        for i, ticket in enumerate(self.tickets):
            if self.closed[i]:
                continue
            tokens, finish, final, failure = ticket.snapshot()
            if failure is not None or finish == "deadline":
                continue
            for count in range(self.seen[i] + 1, len(tokens) + 1):
                text = self._decoded(i, tokens[:count])
                text = text[: len(text) - self.hold] if self.hold and finish is None else text
                if finish is not None and not final.startswith(text):
                    break  # past a stop sequence: the final text below ends before it
                if text.startswith(self.sent[i]) and len(text) > len(self.sent[i]):
                    out.append((i, text[len(self.sent[i]):], None))
                    self.sent[i] = text
            self.seen[i] = len(tokens)
            if finish is None:
                continue
            delta = final[len(self.sent[i]):] if final.startswith(self.sent[i]) else ""
            self.sent[i] += delta
            self.closed[i] = True
            out.append((i, delta, finish))
        return out

    def _decoded(self, i: int, tokens: list[int]) -> str:
        """The text of `tokens`, extending the last decoding by the new token's piece; a piece that ends in half a
        character waits for the next token. O(window), not O(length), per token."""
        prefix, read = self.offsets[i]
        before = self.engine.text_of(tokens[prefix:read])
        after = self.engine.text_of(tokens[prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text[i] += after[len(before):]
            self.offsets[i] = (read, len(tokens))
        return self.text[i]

    def failure(self) -> FtsError | None:
        for ticket in self.tickets:
            _, finish, _, failure = ticket.snapshot()
            if failure is not None:
                return failure
            if finish == "deadline":
                return DeadlineExceeded("generation ran past the request's deadline; ask for fewer max_tokens, or "
                                        "raise --request-timeout", param="max_tokens")
        return None

    def usage(self) -> Usage:
        prompt = sum(t.prompt_tokens for t in self.tickets[:: self.n])  # each prompt once, whatever n
        completion = sum(len(t.snapshot()[0]) for t in self.tickets)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def changed(self) -> None:
        """Until a choice changes, or a poll interval passes."""
        if self.event is None:  # one listener per ticket for the request's whole life
            self.event = asyncio.Event()
            for ticket in self.tickets:
                ticket.listen(asyncio.get_running_loop(), self.event)
        try:
            await asyncio.wait_for(self.event.wait(), DISCONNECT_POLL_SECONDS)
        except TimeoutError:
            pass
        self.event.clear()

    async def wait(self, request: Request) -> None:
        """Until every choice is done; a client that disconnects cancels them."""
        while not self.done:
            if await request.is_disconnected():
                self.cancel()
                return
            await self.changed()


class Stream(StreamingResponse):
    """A streamed answer that gives its queue places back however it ends, even if the body never began (the
    client left before the first byte)."""

    def __init__(self, content: AsyncIterator[bytes], release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


def start(engine: Engine, body: CompletionRequest | ChatRequest, timeout: float, target: tuple[str, Any] | None,
          warning: str | None = None) -> Choices:
    """Encode and queue every choice for `target` (`engine.resolve(body.model)`), raising what the client must
    hear before anything runs."""
    if isinstance(body, ChatRequest):
        prompts = [engine.prompt_ids(None, [m.model_dump(exclude_none=True) for m in body.messages], body.limit)]
    else:
        prompts = [engine.prompt_ids(p, None, body.limit) for p in body.prompt]
    deadline = time.monotonic() + timeout
    tickets = [engine.submit(body.model, ids, max_tokens=body.limit, temperature=body.temperature, top_p=body.top_p,
                             stop=body.stop, seed=None if body.seed is None else (body.seed + j) % 2**63,
                             deadline=deadline, target=target)
               for ids in prompts for j in range(body.n)]
    return Choices(tickets, engine, body.stop, body.n, warning)


def answer(body: CompletionRequest | ChatRequest, choices: Choices, ident: str, created: int) -> JSONResponse:
    """The whole answer, once every choice is done."""
    snapshots = [ticket.snapshot() for ticket in choices.tickets]
    common = {"id": ident, "created": created, "model": body.model, "usage": choices.usage(),
              "fts": AdapterInfo(adapter=choices.tickets[0].key, warning=choices.warning)}
    if isinstance(body, ChatRequest):
        items = [ChatChoice(index=i, finish_reason=finish, message=ChatMessage(content=text))
                 for i, (_, finish, text, _) in enumerate(snapshots)]
        return JSONResponse(ChatCompletionResponse(choices=items, **common).model_dump())
    items = [CompletionChoice(index=i, finish_reason=finish, text=text)
             for i, (_, finish, text, _) in enumerate(snapshots)]
    return JSONResponse(CompletionResponse(choices=items, **common).model_dump())


async def events(body: CompletionRequest | ChatRequest, choices: Choices, ident: str, created: int,
                 refuse: Callable[[FtsError], Awaitable[ApiError]],
                 release: Callable[[], None]) -> AsyncIterator[bytes]:
    """The streamed answer: a chunk per new piece of each choice's text, an error event if generation fails, the
    usage last when asked for, then `[DONE]`."""
    chat = isinstance(body, ChatRequest)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(items: list, usage: Usage | None = None) -> bytes:
        model = ChatCompletionChunk if chat else CompletionChunk
        payload = model(id=ident, created=created, model=body.model, choices=items, usage=usage)
        return f"data: {json.dumps(payload.model_dump(exclude=None if include_usage else {'usage'}))}\n\n".encode()

    try:
        if chat:
            yield chunk([ChatRoleChoice(index=i) for i in range(len(choices.tickets))])
        while True:
            for i, delta, finish in choices.deltas():
                yield chunk([ChatStreamChoice(index=i, finish_reason=finish, delta=ChatDelta(content=delta or None))
                             if chat else CompletionChoice(index=i, finish_reason=finish, text=delta)])
            problem = choices.failure()
            if problem is not None:  # as OpenAI streams an error: one event with the error object
                yield f"data: {json.dumps((await refuse(problem)).body())}\n\n".encode()
                break
            if choices.done and all(choices.closed):
                if include_usage:
                    yield chunk([], usage=choices.usage())
                break
            await choices.changed()
        yield b"data: [DONE]\n\n"
    finally:
        release()  # the client went away, or the stream ended: nothing left runs for it


async def generate(request: Request, body: CompletionRequest | ChatRequest, key: Key | None) -> Response:
    """Admit the request's sequences to the queue, queue them, and answer whole or as a stream."""
    state = state_of(request)
    count = body.sequences
    state.admission.enter(count)

    async def refuse(exc: FtsError) -> ApiError:
        return await state.refusal(exc, key)

    streaming = False
    try:
        try:  # resolving may read an HTTP store and hash files, encoding is CPU work: both off the event loop
            target, warning = await state.resolve(body.model)
            choices = await anyio.to_thread.run_sync(start, state.engine, body, state.config.request_timeout, target,
                                                     warning)
        except FtsError as exc:
            raise await refuse(exc) from exc
        ident = f"{'chatcmpl' if isinstance(body, ChatRequest) else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if body.stream:
            streaming = True
            released = []

            def release() -> None:  # once, whether the stream ended, failed, or never started
                if not released:
                    released.append(True)
                    choices.cancel()
                    state.admission.leave(count)

            return Stream(events(body, choices, ident, created, refuse, release), release,
                          media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            await choices.wait(request)
        finally:
            choices.cancel()
        problem = choices.failure()
        if problem is not None:
            raise await refuse(problem)
        return answer(body, choices, ident, created)
    finally:
        if not streaming:
            state.admission.leave(count)
