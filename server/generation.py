"""`POST /v1/chat/completions` and `POST /v1/completions`: vLLM's handlers, plus steering.

The request body is vLLM's request model plus a top-level `steering` field. Steering is
resolved and compiled here, before vLLM's handler runs, so that every spec problem is a
400 (413 for oversized inline data, 404 for an unknown preset) even for streamed requests,
whose status line is sent before the engine sees them. vLLM's handler then renders the
prompt, runs the engine and builds the response exactly as `vllm serve` does; the compiled
spec rides in the sampling params' `extra_args`. The response gains a `steering` object
(what was applied, and for layer-reading decoding what it chose per choice) and an
`x-steering-fingerprint` header.

A request in an A/B experiment (named by `"experiment"` / `X-Experiment`, or taken by an
experiment's traffic share) gets its arm's steering composed before its own; the response
names experiment, arm and version, and is not completed before the assignment is durable
(so feedback on its id can never find it missing). `"variants"` goes to `variants.py`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from steering.engine import openai_server as vllm_api

from .applied import Applied
from .calls import (
    CLIENT_CLOSED,
    CallStatus,
    Track,
    admit,
    decoding_reports,
    finish,
    is_whole_response,
    prompt_count,
    run_handler,
    validated_request,
    wants_prompt_logprobs,
)
from .errors import APIError
from .experiments.registry import Enrollment, UnavailableExperiment, UnknownExperiment
from .readouts import RequestReadout, rest_of_stream
from .state import ServerState, state_of

log = logging.getLogger(__name__)
router = APIRouter()

FINGERPRINT_HEADER = "x-steering-fingerprint"
EXPERIMENT_HEADER = "x-experiment"
UNIT_HEADER = "x-unit-id"


@dataclass
class Recorded:
    """An experiment response being recorded: its assignment is queued as `durable`."""

    enrollment: Enrollment
    response_id: str
    durable: Future

    async def wait(self) -> bool:
        """Whether the assignment is committed (False: the store failed; logged)."""
        try:
            await asyncio.wrap_future(self.durable)
            return True
        except Exception as e:
            log.error(
                "experiment %s: assignment of %s not recorded: %s",
                self.enrollment.experiment,
                self.response_id,
                e,
            )
            return False


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
    if "variants" in body:
        from .variants import serve_variants

        return await serve_variants(raw_request, body, chat=chat)
    state = state_of(raw_request)
    track = Track()
    call = CallStatus()
    recorded: Recorded | None = None
    try:
        with call.recording():
            request, applied, enrollment = _parse(state, raw_request, body, chat=chat)
            track.n = request.n or 1
            track.labels = state.metrics.labels(applied.preset, applied.kind)
            if applied.reads:
                track.readout = RequestReadout(state.readouts, applied.spec.readout, track.n)
            state.metrics.running.labels(**track.labels).inc()
            admit(state, track.n * prompt_count(request, chat=chat))
            if enrollment is not None and enrollment.arm is not None:
                rid = vllm_api.response_id(raw_request, request, chat=chat)
                durable = state.experiments.record(enrollment, rid, request.model)
                recorded = Recorded(enrollment, rid, durable)
            result = await run_handler(raw_request, request, track, chat=chat)
            if isinstance(result, vllm_api.ErrorResponse):
                call.status = result.error.code
                return JSONResponse(result.model_dump(), status_code=call.status)
            headers = {FINGERPRINT_HEADER: applied.fingerprint or "none"}
            if enrollment is not None:
                headers.update(enrollment.headers())
            call.status = 200
            if is_whole_response(result):
                content = result.model_dump()
                content["steering"] = await _echo(state, applied, enrollment, track)
                if track.readout is not None:
                    for choice in content["choices"]:
                        choice["readout"] = track.readout.whole(choice["index"])
                if recorded is not None:
                    _check_id(recorded, content.get("id"))
                    if not await recorded.wait():
                        headers["x-experiment-recorded"] = "false"
                return JSONResponse(content, headers=headers)
            call.streaming = True
            return StreamingResponse(
                _stream(state, result, applied, enrollment, track, recorded, chat=chat),
                media_type="text/event-stream",
                headers=headers,
            )
    finally:
        if not call.streaming:
            _end(state, track, call.status, recorded)


def _parse(
    state: ServerState, raw_request: Request, body: dict, *, chat: bool
) -> tuple[Any, Applied, Enrollment | None]:
    raw_steering = body.pop("steering", None)
    experiment = _experiment_name(raw_request, body.pop("experiment", None))
    request = validated_request(body, chat=chat)
    enrollment = None
    try:
        enrollment = state.experiments.enroll(
            experiment,
            model=request.model,
            unit=raw_request.headers.get(UNIT_HEADER) or request.user,
            request_key=request.request_id,
            steered=raw_steering is not None,
        )
    except UnknownExperiment:
        raise APIError(
            404, f"experiment: unknown experiment {experiment!r}", "experiment"
        ) from None
    except UnavailableExperiment as e:
        raise APIError(503, f"experiment: {e}", "experiment") from None
    arm = enrollment.spec if enrollment is not None else None
    applied = state.resolver.resolve(
        raw_steering, prompt_logprobs=wants_prompt_logprobs(request), base=arm
    )
    if applied.compiled is not None:
        request.vllm_xargs = {**(request.vllm_xargs or {}), "steering": applied.compiled}
    return request, applied, enrollment


def _experiment_name(raw_request: Request, field: Any) -> str | None:
    header = raw_request.headers.get(EXPERIMENT_HEADER)
    if field is not None and not isinstance(field, str):
        raise APIError(400, "experiment: must be an experiment's name", "experiment")
    if field is not None and header is not None and field != header:
        raise APIError(
            400,
            f"experiment: {field!r} differs from the X-Experiment header {header!r}",
            "experiment",
        )
    return field if field is not None else header


def _check_id(recorded: Recorded, actual: str | None) -> None:
    if actual != recorded.response_id:  # vLLM changed how it names responses
        log.error(
            "response id %s recorded as %s: feedback on it will not be found",
            actual,
            recorded.response_id,
        )


def _end(state: ServerState, track: Track, status: int, recorded: Recorded | None) -> None:
    latency = finish(state, track, status)
    if recorded is not None:
        state.experiments.finish(
            recorded.enrollment,
            recorded.response_id,
            status,
            track.prompt_tokens,
            track.generation_tokens,
            track.ttft,
            latency,
        )


def _head_echo(applied: Applied, enrollment: Enrollment | None) -> dict[str, Any]:
    echo = applied.echo()
    if enrollment is not None:
        echo.update(enrollment.echo())
    return echo


async def _echo(
    state: ServerState, applied: Applied, enrollment: Enrollment | None, track: Track
) -> dict[str, Any]:
    echo = _head_echo(applied, enrollment)
    if applied.reports_decoding:
        echo["decoding"]["choices"] = await decoding_reports(state, track)
    return echo


async def _stream(
    state: ServerState,
    chunks: AsyncGenerator[str, None],
    applied: Applied,
    enrollment: Enrollment | None,
    track: Track,
    recorded: Recorded | None,
    *,
    chat: bool,
) -> AsyncIterator[str]:
    """vLLM's SSE chunks, the first one carrying `steering`, each carrying its tokens'
    readout values if asked; the values left and decoding reports before `[DONE]`."""
    status = 200
    head: dict[str, Any] | None = None  # id, object, created, model of the first chunk
    try:
        async for chunk in chunks:
            if track.readout is not None and chunk.startswith('data: {"id"'):
                chunk = _with_readout(chunk, track.readout)
            if head is None and chunk.startswith("data: {"):
                first = json.loads(chunk[len("data: ") :])
                head = {k: first[k] for k in ("id", "object", "created", "model") if k in first}
                if recorded is not None:
                    _check_id(recorded, head.get("id"))
                echo = json.dumps(_head_echo(applied, enrollment))
                chunk = f'data: {{"steering": {echo}, {chunk[len("data: {") :]}'
            elif chunk.startswith("data: [DONE]"):
                rest = [] if track.readout is None else rest_of_stream(track.readout, chat=chat)
                if rest:
                    yield f"data: {json.dumps({**(head or {}), 'choices': rest})}\n\n"
                if applied.reports_decoding:
                    tail = {
                        **(head or {}),
                        "choices": [],
                        "steering": await _echo(state, applied, enrollment, track),
                    }
                    yield f"data: {json.dumps(tail)}\n\n"
                if recorded is not None:
                    await recorded.wait()
            elif chunk.startswith('data: {"error"'):
                status = json.loads(chunk[len("data: ") :])["error"].get("code", 500)
            yield chunk
    except (asyncio.CancelledError, GeneratorExit):
        status = CLIENT_CLOSED
        raise
    finally:
        _end(state, track, status, recorded)


def _with_readout(chunk: str, readout: RequestReadout) -> str:
    data = json.loads(chunk[len("data: ") :])
    for choice in data.get("choices", []):
        values = readout.delta(choice["index"])
        if values is not None:
            choice["readout"] = values
    return f"data: {json.dumps(data)}\n\n"
