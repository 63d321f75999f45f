"""The one path every chat/completion call takes: prepare, admit, run, respond, record.

A route builds a `Call` (a plain or experiment request in `generation.py`, side-by-side
variants in `variants.py`) and hands it to `serve`, which owns the order of things and
what happens on failure:

1. `call.prepare()`: parse and resolve the body into vLLM request models (any problem
   is an `APIError`, so streamed requests get a 4xx before their status line);
2. admission: refuse now (503) what vLLM's queue would refuse later; `call.admitted()`;
3. vLLM's handler for every request at once (so they share engine steps), each engine
   request observed by its `Track`;
4. a whole response (`call.whole`) or an event stream whose events `call.event` edits and
   `call.tail` extends before the one `[DONE]`;
5. `call.end(status)` exactly once, with the status the client saw (499 if it left).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from steering.engine import openai_server as vllm_api

from . import sse
from .calls import CLIENT_CLOSED, CallStatus, Track, admit, is_whole_response, run_handler
from .state import ServerState

# Fields of a response's first event repeated on the events steerserve adds to a stream.
HEAD_FIELDS = ("id", "object", "created", "model")


class Call(ABC):
    """One HTTP call's work around vLLM's handler (see the module docstring)."""

    def __init__(self, state: ServerState, raw_request: Request, body: dict, *, chat: bool):
        self.state = state
        self.raw_request = raw_request
        self.body = body
        self.chat = chat
        self.tracks: list[Track] = []  # one per engine request, set by prepare
        self.headers: dict[str, str] = {}
        self.head: dict[str, Any] | None = None  # HEAD_FIELDS of the first streamed event

    @abstractmethod
    def prepare(self) -> list[Any]:
        """vLLM request models to run (one Track each in `self.tracks`), or an APIError."""

    @property
    def sequences(self) -> int:
        """Sequences the engine will hold for this call (admission counts them)."""
        return len(self.tracks)

    def admitted(self) -> None:  # noqa: B027 (optional hook)
        """Called once the engine has room for the call, before it runs."""

    @abstractmethod
    async def whole(self, results: list[Any]) -> dict[str, Any]:
        """The JSON body of a non-streamed response from vLLM's responses."""

    @abstractmethod
    def event(self, index: int, data: dict[str, Any]) -> dict[str, Any] | None:
        """A streamed event of request `index`, edited (None: not sent on)."""

    @abstractmethod
    async def tail(self) -> list[dict[str, Any]]:
        """Events to send after every request's stream ended, before `[DONE]`."""

    @abstractmethod
    def end(self, status: int) -> None:
        """Record the call's metrics (and experiment outcome) with its final status."""

    def first_event(self, data: dict[str, Any]) -> bool:
        """Note the stream's head; True for the first event."""
        if self.head is not None:
            return False
        self.head = {k: data[k] for k in HEAD_FIELDS if k in data}
        return True

    def headed(self, **fields: Any) -> dict[str, Any]:
        """An event of our own, with the stream's id, object, created and model."""
        return {**(self.head or {}), **fields}


async def serve(call: Call) -> Response:
    outcome = CallStatus()
    try:
        with outcome.recording():
            requests = call.prepare()
            admit(call.state, call.sequences)
            call.admitted()
            results = await _run_together(call, requests)
            for r in results:
                if isinstance(r, vllm_api.ErrorResponse):
                    outcome.status = r.error.code
                    return JSONResponse(r.model_dump(), status_code=outcome.status)
            outcome.status = 200
            if is_whole_response(results[0]):
                content = await call.whole(results)
                return JSONResponse(content, headers=call.headers)
            outcome.streaming = True
            return StreamingResponse(
                _events(call, results), media_type="text/event-stream", headers=call.headers
            )
    finally:
        if not outcome.streaming:
            call.end(outcome.status)


async def _run_together(call: Call, requests: list[Any]) -> list[Any]:
    """vLLM's handler for every request at once, so they enter the same engine steps."""
    if len(requests) == 1:
        return [await run_handler(call.raw_request, requests[0], call.tracks[0], chat=call.chat)]
    tasks = [
        asyncio.ensure_future(run_handler(call.raw_request, r, t, chat=call.chat))
        for r, t in zip(requests, call.tracks, strict=True)
    ]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


async def _events(call: Call, streams: list[Any]) -> AsyncIterator[str]:
    """Every stream's events, edited by the call; its tail; one `[DONE]`."""
    status = 200
    merged = _merge(streams)
    try:
        async for index, chunk in merged:
            event = sse.decode(chunk)
            if event.data is None:
                if not event.done:
                    yield chunk
                continue  # each stream's [DONE]: ours comes last
            if event.error is not None:
                status = event.error.get("code", 500)
                yield chunk
                continue
            data = call.event(index, event.data)
            if data is not None:
                yield sse.encode(data)
        for data in await call.tail():
            yield sse.encode(data)
        yield sse.DONE_EVENT
    except (asyncio.CancelledError, GeneratorExit):
        status = CLIENT_CLOSED
        raise
    finally:
        await merged.aclose()
        call.end(status)


async def _merge(streams: list[Any]) -> AsyncIterator[tuple[int, str]]:
    """(stream index, chunk) as the chunks come; a stream's failure is raised here."""
    if len(streams) == 1:
        try:
            async for chunk in streams[0]:
                yield 0, chunk
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, str | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, chunks: Any) -> None:
        try:
            async for chunk in chunks:
                await queue.put((i, chunk))
        except Exception as e:  # handed to the reader, which raises it
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for p in pumps:
            p.cancel()
        # Let each pump unwind (closing its engine request) before closing what is left.
        await asyncio.gather(*pumps, return_exceptions=True)
        for s in streams:
            await s.aclose()
