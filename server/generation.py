"""`POST /v1/chat/completions` and `POST /v1/completions`: vLLM's handlers, plus steering.

The request body is vLLM's request model plus a top-level `steering` field. Steering is
resolved and compiled here, before vLLM's handler runs, so that every spec problem is a
400 (413 for oversized inline data, 404 for an unknown preset) even for streamed requests,
whose status line is sent before the engine sees them. vLLM's handler then renders the
prompt, runs the engine and builds the response exactly as `vllm serve` does; the compiled
spec rides in the sampling params' `extra_args`. The response gains a `steering` object
(what was applied, and for layer-reading decoding what it chose per choice) and an
`x-steering-fingerprint` header.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from steering.engine import openai_server as vllm_api

from .applied import Applied
from .errors import APIError
from .state import ServerState, state_of

router = APIRouter()

FINGERPRINT_HEADER = "x-steering-fingerprint"
# Status recorded for a request whose client went away (nginx's convention).
CLIENT_CLOSED = 499


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

    def watch(self, outputs: AsyncGenerator, engine_id: str) -> AsyncGenerator:
        self.engine_ids.append(engine_id)
        return self._watch(outputs)

    async def _watch(self, outputs: AsyncGenerator) -> AsyncIterator[Any]:
        counted_prompts: set[str] = set()
        try:
            async for out in outputs:
                if out.request_id not in counted_prompts and out.prompt_token_ids is not None:
                    counted_prompts.add(out.request_id)
                    self.prompt_tokens += len(out.prompt_token_ids)
                # The server streams deltas and returns finals: each token is seen once.
                new = sum(len(o.token_ids) for o in out.outputs)
                if new and self.first_token is None:
                    self.first_token = time.monotonic()
                self.generation_tokens += new
                yield out
        finally:
            await outputs.aclose()  # aborts the engine request if we stopped early


# The request being served in this task; read by the engine's `generate` when vLLM's
# handler calls it (synchronously, in the handler's task).
_CURRENT: contextvars.ContextVar[Track | None] = contextvars.ContextVar("steerserve_track")


def observe_engine(engine: Any) -> None:
    """Route the engine's `generate` through the current request's Track."""
    original = engine.generate

    def generate(prompt: Any, sampling_params: Any, request_id: str, *args: Any, **kw: Any):
        outputs = original(prompt, sampling_params, request_id, *args, **kw)
        track = _CURRENT.get(None)
        return outputs if track is None else track.watch(outputs, request_id)

    engine.generate = generate


async def json_body(request: Request) -> dict:
    """The body as a JSON object, read before the handler (see `with_cancellation`)."""
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


JSONBody = Annotated[dict, Depends(json_body)]


@router.post("/v1/chat/completions")
@vllm_api.with_cancellation
async def create_chat_completion(raw_request: Request, body: JSONBody):
    return await _serve(raw_request, body, chat=True)


@router.post("/v1/completions")
@vllm_api.with_cancellation
async def create_completion(raw_request: Request, body: JSONBody):
    return await _serve(raw_request, body, chat=False)


async def _serve(raw_request: Request, body: dict, *, chat: bool) -> Response:
    state = state_of(raw_request)
    track = Track()
    applied: Applied | None = None
    status = 500
    streaming = False
    try:
        request, applied = _parse(state, body, chat=chat)
        track.n = request.n or 1
        track.labels = state.metrics.labels(applied.preset, applied.kind)
        state.metrics.running.labels(**track.labels).inc()
        handler = vllm_api.serving_chat(raw_request.app) if chat else (
            vllm_api.serving_completion(raw_request.app)
        )  # fmt: skip
        if handler is None:
            raise APIError(404, f"the model does not serve the {'chat ' if chat else ''}"
                           "completions API")  # fmt: skip
        _admit(state, request, chat=chat)
        token = _CURRENT.set(track)
        try:
            if chat:
                result = await handler.create_chat_completion(request, raw_request)
            else:
                result = await handler.create_completion(request, raw_request)
        finally:
            _CURRENT.reset(token)
        if isinstance(result, vllm_api.ErrorResponse):
            status = result.error.code
            return JSONResponse(result.model_dump(), status_code=status)
        headers = {FINGERPRINT_HEADER: applied.fingerprint or "none"}
        if isinstance(result, (vllm_api.ChatCompletionResponse, vllm_api.CompletionResponse)):
            content = result.model_dump()
            content["steering"] = await _echo(state, applied, track)
            status = 200
            return JSONResponse(content, headers=headers)
        streaming = True
        status = 200
        return StreamingResponse(
            _stream(state, result, applied, track),
            media_type="text/event-stream",
            headers=headers,
        )
    except APIError as e:
        status = e.status
        raise
    except vllm_api.EngineDeadError:
        status = 503
        raise APIError(503, "the engine is not running; the server must be restarted") from None
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        if not streaming:
            _finish(state, applied, track, status)


def _parse(state: ServerState, body: dict, *, chat: bool) -> tuple[Any, Applied]:
    raw_steering = body.pop("steering", None)
    xargs = body.get("vllm_xargs")
    if isinstance(xargs, dict) and "steering" in xargs:
        raise APIError(400, "pass steering as the top-level 'steering' field",
                       "vllm_xargs.steering")  # fmt: skip
    model = vllm_api.ChatCompletionRequest if chat else vllm_api.CompletionRequest
    try:
        request = model.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param) from None
    prompt_logprobs = request.prompt_logprobs is not None or bool(
        getattr(request, "echo", False) and request.logprobs
    )
    applied = state.resolver.resolve(raw_steering, prompt_logprobs=prompt_logprobs)
    if applied.compiled is not None:
        request.vllm_xargs = {**(request.vllm_xargs or {}), "steering": applied.compiled}
    return request, applied


def _admit(state: ServerState, request: Any, *, chat: bool) -> None:
    if vllm_api.engine_errored(state.engine):
        raise APIError(503, "the engine is not running; the server must be restarted")
    prompts = 1
    # A list of prompts (not one prompt as a token list) fans out into one request each.
    if not chat and isinstance(request.prompt, list) and request.prompt:
        prompts = 1 if isinstance(request.prompt[0], int) else len(request.prompt)
    try:
        vllm_api.admit(state.engine, (request.n or 1) * prompts)
    except vllm_api.GracefulHTTPError as e:
        raise APIError(int(e.http_status), e.message, headers={"Retry-After": "1"}) from None


async def _echo(state: ServerState, applied: Applied, track: Track) -> dict[str, Any]:
    echo = applied.echo()
    if applied.reports_decoding:
        echo["decoding"]["choices"] = await _decoding_reports(state, track)
    return echo


async def _decoding_reports(state: ServerState, track: Track) -> list[dict]:
    """What layer-reading decoding chose for each choice, in choice order."""
    choices: list[dict] = []
    for prompt_index, engine_id in enumerate(track.engine_ids):
        reports = await vllm_api.worker_call(state.engine, "reports", engine_id) or {}
        for child, report in sorted(reports.items()):
            choices.append({"index": prompt_index * track.n + child, **report})
    return choices


async def _stream(
    state: ServerState, chunks: AsyncGenerator[str, None], applied: Applied, track: Track
) -> AsyncIterator[str]:
    """vLLM's SSE chunks, the first one carrying `steering`; reports before `[DONE]`."""
    status = 200
    head: dict[str, Any] | None = None  # id, object, created, model of the first chunk
    try:
        async for chunk in chunks:
            if head is None and chunk.startswith("data: {"):
                first = json.loads(chunk[len("data: ") :])
                head = {k: first[k] for k in ("id", "object", "created", "model") if k in first}
                echo = json.dumps(applied.echo())
                chunk = f'data: {{"steering": {echo}, {chunk[len("data: {") :]}'
            elif chunk.startswith("data: [DONE]"):
                if applied.reports_decoding:
                    tail = {**(head or {}), "choices": [],
                            "steering": await _echo(state, applied, track)}  # fmt: skip
                    yield f"data: {json.dumps(tail)}\n\n"
            elif chunk.startswith('data: {"error"'):
                status = json.loads(chunk[len("data: ") :])["error"].get("code", 500)
            yield chunk
    except (asyncio.CancelledError, GeneratorExit):
        status = CLIENT_CLOSED
        raise
    finally:
        _finish(state, applied, track, status)


def _finish(state: ServerState, applied: Applied | None, track: Track, status: int) -> None:
    m = state.metrics
    labels = track.labels or m.labels(None, "none")
    if track.labels is not None:
        m.running.labels(**labels).dec()
    m.requests.labels(**labels, status=str(status)).inc()
    # Tokens the engine produced count even if the client left; latencies only when served.
    m.prompt_tokens.labels(**labels).inc(track.prompt_tokens)
    m.generation_tokens.labels(**labels).inc(track.generation_tokens)
    if status != 200:
        return
    if track.first_token is not None:
        m.ttft.labels(**labels).observe(track.first_token - track.started)
    m.e2e.labels(**labels).observe(time.monotonic() - track.started)
