"""`"variants": [spec_a, spec_b, ...]`: one choice per spec for the same prompt.

The side-by-side a team looks at before an A/B test. Each variant is its own engine
request (a different spec), all with one sampling seed (the request's, or one drawn here
and echoed) and submitted together, so they run in the same engine steps. Choice i is
variant i; usage counts the prompt once and every variant's completion; `steering.variants`
echoes what each got. Streams interleave the variants' chunks, re-indexed.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
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
from .readouts import RequestReadout, rest_of_stream
from .state import ServerState, state_of

MAX_VARIANTS = 16
KIND = "variants"  # metric label


async def serve_variants(raw_request: Request, body: dict, *, chat: bool) -> Response:
    state = state_of(raw_request)
    labels = state.metrics.labels(None, KIND)
    tracks: list[Track] = []
    state.metrics.running.labels(**labels).inc()
    call = CallStatus()
    try:
        with call.recording():
            request, applied, seed, calls = _prepare(state, raw_request, body, chat=chat)
            tracks[:] = [Track(labels=labels) for _ in calls]
            for t, a in zip(tracks, applied, strict=True):
                if a.reads:
                    t.readout = RequestReadout(state.readouts, a.spec.readout, 1)
            admit(state, len(calls))
            results = await _run_together(raw_request, calls, tracks, chat=chat)
            for r in results:
                if isinstance(r, vllm_api.ErrorResponse):
                    call.status = r.error.code
                    return JSONResponse(r.model_dump(), status_code=call.status)
            merged_id = vllm_api.response_id(raw_request, request, chat=chat)
            call.status = 200
            if is_whole_response(results[0]):
                content = _merge(results, merged_id, tracks)
                content["steering"] = await _echo(state, applied, tracks, seed)
                return JSONResponse(content)
            call.streaming = True
            return StreamingResponse(
                _stream(state, results, applied, tracks, seed, merged_id, labels, chat=chat),
                media_type="text/event-stream",
            )
    finally:
        if not call.streaming:
            finish(state, Track.total(tracks or [Track()], labels), call.status)


def _prepare(
    state: ServerState, raw_request: Request, body: dict, *, chat: bool
) -> tuple[Any, list[Applied], int, list[Any]]:
    """The request, each variant's steering, the shared seed, and one request per variant."""
    variants = body.pop("variants")
    for field in ("steering", "experiment"):
        if field in body:
            raise APIError(
                400,
                f"{field}: cannot be combined with variants (give each variant its full spec)",
                field,
            )
    if raw_request.headers.get("x-experiment") is not None:
        raise APIError(400, "X-Experiment cannot be combined with variants", "experiment")
    if not isinstance(variants, list) or not 1 <= len(variants) <= MAX_VARIANTS:
        raise APIError(
            400,
            f"variants: must be a list of 1 to {MAX_VARIANTS} steering specs (null for unsteered)",
            "variants",
        )
    request = validated_request(body, chat=chat)
    if (request.n or 1) != 1:
        raise APIError(400, "n: must be 1 with variants (each variant is one choice)", "n")
    if prompt_count(request, chat=chat) != 1:
        raise APIError(400, "prompt: variants take a single prompt", "prompt")
    applied = [_resolve(state, v, i, request) for i, v in enumerate(variants)]
    seed = request.seed if request.seed is not None else secrets.randbits(31)
    calls = []
    for i, a in enumerate(applied):
        sub = request.model_copy(deep=True)
        sub.seed = seed
        sub.request_id = f"{request.request_id}-v{i}"
        if a.compiled is not None:
            sub.vllm_xargs = {**(sub.vllm_xargs or {}), "steering": a.compiled}
        calls.append(sub)
    return request, applied, seed, calls


async def _run_together(
    raw_request: Request, calls: list[Any], tracks: list[Track], *, chat: bool
) -> list[Any]:
    """vLLM's handler for every variant at once, so they enter the same engine steps."""
    tasks = [
        asyncio.ensure_future(run_handler(raw_request, sub, t, chat=chat))
        for sub, t in zip(calls, tracks, strict=True)
    ]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


def _resolve(state: ServerState, raw: Any, i: int, request: Any) -> Applied:
    if raw is not None and not isinstance(raw, dict):
        raise APIError(400, f"variants[{i}]: must be a steering spec or null", f"variants[{i}]")
    try:
        return state.resolver.resolve(raw, prompt_logprobs=wants_prompt_logprobs(request))
    except APIError as e:  # name the variant, not `steering`
        param = (e.param or "steering").replace("steering", f"variants[{i}]", 1)
        message = e.message.replace("steering", f"variants[{i}]", 1)
        raise APIError(e.status, message, param) from None


def _merge(results: list[Any], merged_id: str, tracks: list[Track]) -> dict[str, Any]:
    first = results[0].model_dump()
    choices = []
    for i, (r, t) in enumerate(zip(results, tracks, strict=True)):
        (choice,) = r.model_dump()["choices"]
        if t.readout is not None:
            choice["readout"] = t.readout.whole(0)
        choices.append({**choice, "index": i})
    completion = sum(r.usage.completion_tokens or 0 for r in results)
    prompt = first["usage"]["prompt_tokens"]
    first.update(
        id=merged_id,
        choices=choices,
        usage={
            **first["usage"],
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    )
    return first


async def _echo(
    state: ServerState, applied: list[Applied], tracks: list[Track], seed: int
) -> dict[str, Any]:
    out = []
    for i, (a, t) in enumerate(zip(applied, tracks, strict=True)):
        echo = {"index": i, **a.echo()}
        if a.reports_decoding:
            reports = await decoding_reports(state, t)
            echo["decoding"]["choices"] = [{**r, "index": i} for r in reports]
        out.append(echo)
    return {"variants": out, "seed": seed}


async def _stream(
    state: ServerState,
    streams: list[Any],
    applied: list[Applied],
    tracks: list[Track],
    seed: int,
    merged_id: str,
    labels: dict[str, str],
    *,
    chat: bool,
) -> AsyncIterator[str]:
    """The variants' chunks as they come, choice index = variant index, one usage chunk
    and one `[DONE]` at the end."""
    queue: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()

    async def pump(i: int, chunks: Any) -> None:
        try:
            async for chunk in chunks:
                await queue.put((i, chunk))
        finally:
            await queue.put((i, None))

    pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    status = 200
    usage: dict[str, int] | None = None
    head: dict[str, Any] | None = None
    open_streams = len(streams)
    try:
        while open_streams:
            i, chunk = await queue.get()
            if chunk is None:
                open_streams -= 1
                continue
            if not chunk.startswith("data: {"):
                continue  # each variant's [DONE]; ours comes last
            data = json.loads(chunk[len("data: ") :])
            if "error" in data:
                status = data["error"].get("code", 500)
                yield chunk
                continue
            data["id"] = merged_id
            if not data.get("choices") and data.get("usage"):
                usage = _add_usage(usage, data["usage"])
                continue
            reads = tracks[i].readout
            for choice in data.get("choices", []):
                choice["index"] = i
                values = None if reads is None else reads.delta(0)
                if values is not None:
                    choice["readout"] = values
            if head is None:
                head = {k: data[k] for k in ("id", "object", "created", "model") if k in data}
                data = {
                    "steering": {
                        "variants": [{"index": k, **a.echo()} for k, a in enumerate(applied)],
                        "seed": seed,
                    },
                    **data,
                }
            yield f"data: {json.dumps(data)}\n\n"
        rest = [
            c
            for i, t in enumerate(tracks)
            if t.readout is not None
            for c in rest_of_stream(t.readout, chat=chat, index=i)
        ]
        if rest:
            yield f"data: {json.dumps({**(head or {}), 'choices': rest})}\n\n"
        if usage is not None:
            yield f"data: {json.dumps({**(head or {}), 'choices': [], 'usage': usage})}\n\n"
        if any(a.reports_decoding for a in applied):
            tail = {
                **(head or {}),
                "choices": [],
                "steering": await _echo(state, applied, tracks, seed),
            }
            yield f"data: {json.dumps(tail)}\n\n"
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        status = CLIENT_CLOSED
        raise
    finally:
        for p in pumps:
            p.cancel()
        for s in streams:
            await s.aclose()
        finish(state, Track.total(tracks, labels), status)


def _add_usage(total: dict[str, int] | None, usage: dict[str, Any]) -> dict[str, int]:
    if total is None:
        return {k: v for k, v in usage.items() if isinstance(v, int)}
    completion = total["completion_tokens"] + usage.get("completion_tokens", 0)
    return {
        **total,
        "completion_tokens": completion,
        "total_tokens": total["prompt_tokens"] + completion,
    }
