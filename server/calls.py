"""One call of vLLM's chat/completion handler, observed: what both the plain and the
variants routes (`generation.py`, `variants.py`) do around it.

`Track` follows the engine requests one HTTP call makes (tokens, first-token time, engine
ids for decoding reports); `observe_engine` routes the engine's `generate` through the
Track of the calling task, which vLLM's handler runs in.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from steering.engine import openai_server as vllm_api

from .errors import APIError, invalid
from .readouts import RequestReadout
from .state import ServerState

# Status recorded for a request whose client went away (nginx's convention).
CLIENT_CLOSED = 499


@dataclass
class CallStatus:
    """The HTTP status a call ends with, for its metrics and records. `streaming`: the
    response's stream records it when it ends, not the route."""

    status: int = 500
    streaming: bool = False

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Note the status of an error leaving the route (and make a dead engine a 503)."""
        try:
            yield
        except APIError as e:
            self.status = e.status
            raise
        except vllm_api.EngineDeadError:
            self.status = 503
            raise APIError(503, "the engine is not running; the server must be restarted") from None
        except asyncio.CancelledError:
            self.status = CLIENT_CLOSED
            raise


@dataclass
class Track:
    """What the engine did for one HTTP request, observed on its output stream."""

    started: float = field(default_factory=time.monotonic)
    engine_ids: list[str] = field(default_factory=list)
    first_token: float | None = None
    prompt_tokens: int = 0
    generation_tokens: int = 0
    labels: dict[str, str] | None = None  # metric labels, once the steering is known
    n: int = 1  # choices per prompt: choice index = prompt index * n + child index
    readout: RequestReadout | None = None  # the request reads the stream (spec `readout`)

    def watch(self, outputs: AsyncGenerator, engine_id: str) -> AsyncGenerator:
        self.engine_ids.append(engine_id)
        return self._watch(outputs, engine_id, len(self.engine_ids) - 1, time.monotonic())

    async def _watch(
        self, outputs: AsyncGenerator, engine_id: str, prompt_index: int, submitted: float
    ) -> AsyncIterator[Any]:
        counted_prompts: set[str] = set()
        try:
            async for out in outputs:
                if out.request_id not in counted_prompts and out.prompt_token_ids is not None:
                    counted_prompts.add(out.request_id)
                    self.prompt_tokens += len(out.prompt_token_ids)
                # The server streams deltas and returns finals: each token is seen once.
                new = sum(len(o.token_ids) for o in out.outputs)
                if new:
                    # The engine's own first-token time where it keeps one (a non-streamed
                    # request's stream shows only its final output); else when we saw it.
                    latency = vllm_api.first_token_latency(out)
                    seen = time.monotonic() if latency is None else submitted + latency
                    self.first_token = min(seen, self.first_token or seen)
                self.generation_tokens += new
                if self.readout is not None and (new or out.finished):
                    await self.readout.observe(out, engine_id, prompt_index)
                yield out
        finally:
            await outputs.aclose()  # aborts the engine request if we stopped early

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    @classmethod
    def total(cls, tracks: list[Track], labels: dict[str, str] | None) -> Track:
        firsts = [t.first_token for t in tracks if t.first_token is not None]
        return cls(
            started=min(t.started for t in tracks),
            first_token=min(firsts) if firsts else None,
            prompt_tokens=sum(t.prompt_tokens for t in tracks),
            generation_tokens=sum(t.generation_tokens for t in tracks),
            labels=labels,
        )


# The request being served in this task; read by the engine's `generate` when vLLM's
# handler calls it (synchronously, in the handler's task).
CURRENT: contextvars.ContextVar[Track | None] = contextvars.ContextVar("steerserve_track")


def observe_engine(engine: Any) -> None:
    """Route the engine's output streams through the Track of the request being served."""

    def watch(outputs: AsyncGenerator, request_id: str) -> AsyncGenerator:
        track = CURRENT.get(None)
        return outputs if track is None else track.watch(outputs, request_id)

    vllm_api.observe_generate(engine, watch)


def validated_request(body: dict, *, chat: bool) -> Any:
    """The body (steerserve's fields removed) as vLLM's request model."""
    xargs = body.get("vllm_xargs")
    if isinstance(xargs, dict) and "steering" in xargs:
        raise APIError(
            400, "pass steering as the top-level 'steering' field", "vllm_xargs.steering"
        )
    model = vllm_api.ChatCompletionRequest if chat else vllm_api.CompletionRequest
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise invalid(e) from None


def wants_prompt_logprobs(request: Any) -> bool:
    return request.prompt_logprobs is not None or bool(
        getattr(request, "echo", False) and request.logprobs
    )


def prompt_count(request: Any, *, chat: bool) -> int:
    # A list of prompts (not one prompt as a token list) fans out into one request each.
    if not chat and isinstance(request.prompt, list) and request.prompt:
        return 1 if isinstance(request.prompt[0], int) else len(request.prompt)
    return 1


def admit(state: ServerState, sequences: int) -> None:
    """Refuse now (503) what the engine would refuse after a stream's status line."""
    if vllm_api.engine_errored(state.engine):
        raise APIError(503, "the engine is not running; the server must be restarted")
    try:
        vllm_api.admit(state.engine, sequences)
    except vllm_api.GracefulHTTPError as e:
        raise APIError(int(e.http_status), e.message, headers={"Retry-After": "1"}) from None


async def run_handler(raw_request: Request, request: Any, track: Track, *, chat: bool) -> Any:
    """vLLM's handler for `request`, its engine calls observed by `track`."""
    app = raw_request.app
    handler = vllm_api.serving_chat(app) if chat else vllm_api.serving_completion(app)
    if handler is None:
        raise APIError(
            404, f"the model does not serve the {'chat ' if chat else ''}completions API"
        )
    token = CURRENT.set(track)
    try:
        if chat:
            return await handler.create_chat_completion(request, raw_request)
        return await handler.create_completion(request, raw_request)
    finally:
        CURRENT.reset(token)


def is_whole_response(result: Any) -> bool:
    """A non-streamed response body (else vLLM's handler returned an SSE generator)."""
    return isinstance(result, (vllm_api.ChatCompletionResponse, vllm_api.CompletionResponse))


async def decoding_reports(state: ServerState, track: Track) -> list[dict]:
    """What layer-reading decoding chose for each choice, in choice order."""
    choices: list[dict] = []
    for prompt_index, engine_id in enumerate(track.engine_ids):
        reports = await vllm_api.worker_reports(state.engine, engine_id) or {}
        for child, report in sorted(reports.items()):
            choices.append({"index": prompt_index * track.n + child, **report})
    return choices


async def condition_reports(state: ServerState, track: Track) -> list[dict]:
    """Each choice's conditions (value, fired, decided), in choice order."""
    choices: list[dict] = []
    for prompt_index, engine_id in enumerate(track.engine_ids):
        reports = await vllm_api.worker_conditions(state.engine, engine_id) or {}
        for child, report in sorted(reports.items()):
            choices.append({"index": prompt_index * track.n + child, "conditions": report})
    return choices


def finish(state: ServerState, track: Track, status: int) -> float:
    """Record the request's steerserve metrics; returns the latency it recorded."""
    latency = time.monotonic() - track.started
    m = state.metrics
    labels = track.labels or m.labels(None, "none")
    if track.labels is not None:
        m.running.labels(**labels).dec()
    m.finished.observe(
        labels, status, track.prompt_tokens, track.generation_tokens, track.ttft, latency
    )
    return latency
