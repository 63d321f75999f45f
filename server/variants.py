"""`"variants": [spec_a, spec_b, ...]`: one choice per spec for the same prompt.

The side-by-side a team looks at before an A/B test. Each variant is its own engine
request (a different spec), all with one sampling seed (the request's, or one drawn here
and echoed) and submitted together, so they run in the same engine steps. Choice i is
variant i; usage counts the prompt once and every variant's completion; `steering.variants`
echoes what each got. Streams interleave the variants' chunks, re-indexed.
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import Request

from steering.engine import openai_server as vllm_api

from . import pipeline
from .applied import Applied
from .calls import (
    Track,
    condition_reports,
    decoding_reports,
    finish,
    prompt_count,
    validated_request,
    wants_prompt_logprobs,
)
from .errors import APIError
from .readouts import RequestReadout, rest_of_stream
from .state import ServerState

MAX_VARIANTS = 16
KIND = "variants"  # metric label


class VariantsCall(pipeline.Call):
    """One choice per variant spec: each variant its own engine request, merged here."""

    applied: list[Applied]
    seed: int
    merged_id: str
    usage: dict[str, int] | None = None

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.labels = self.state.metrics.labels(None, KIND)
        self.state.metrics.running.labels(**self.labels).inc()

    def prepare(self) -> list[Any]:
        request, self.applied, self.seed, calls = _prepare(
            self.state, self.raw_request, self.body, chat=self.chat
        )
        self.tracks = [Track(labels=self.labels) for _ in calls]
        for t, a in zip(self.tracks, self.applied, strict=True):
            if a.reads:
                t.readout = RequestReadout(self.state.readouts, a.spec.readout, 1)
        self.merged_id = vllm_api.response_id(self.raw_request, request, chat=self.chat)
        return calls

    async def whole(self, results: list[Any]) -> dict[str, Any]:
        content = _merge(results, self.merged_id, self.tracks)
        content["steering"] = await self._echo()
        return content

    def event(self, index: int, data: dict[str, Any]) -> dict[str, Any] | None:
        data["id"] = self.merged_id
        if not data.get("choices") and data.get("usage"):
            self.usage = _add_usage(self.usage, data["usage"])
            return None  # one usage event for all variants, in the tail
        reads = self.tracks[index].readout
        for choice in data.get("choices", []):
            choice["index"] = index
            values = None if reads is None else reads.delta(0)
            if values is not None:
                choice["readout"] = values
        if self.first_event(data):
            data = {"steering": self._head_echo(), **data}
        return data

    async def tail(self) -> list[dict[str, Any]]:
        events = []
        rest = [
            c
            for i, t in enumerate(self.tracks)
            if t.readout is not None
            for c in rest_of_stream(t.readout, chat=self.chat, index=i)
        ]
        if rest:
            events.append(self.headed(choices=rest))
        if self.usage is not None:
            events.append(self.headed(choices=[], usage=self.usage))
        if any(a.reports_at_end for a in self.applied):
            events.append(self.headed(choices=[], steering=await self._echo()))
        return events

    def end(self, status: int) -> None:
        finish(self.state, Track.total(self.tracks or [Track()], self.labels), status)

    def _head_echo(self) -> dict[str, Any]:
        variants = [{"index": i, **a.echo()} for i, a in enumerate(self.applied)]
        return {"variants": variants, "seed": self.seed}

    async def _echo(self) -> dict[str, Any]:
        out = []
        for i, (a, t) in enumerate(zip(self.applied, self.tracks, strict=True)):
            echo = {"index": i, **a.echo()}
            if a.reports_decoding:
                reports = await decoding_reports(self.state, t)
                echo["decoding"]["choices"] = [{**r, "index": i} for r in reports]
            if a.reports_conditions:
                reports = await condition_reports(self.state, t)
                echo["conditions"]["choices"] = [{**r, "index": i} for r in reports]
            out.append(echo)
        return {"variants": out, "seed": self.seed}


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


def _add_usage(total: dict[str, int] | None, usage: dict[str, Any]) -> dict[str, int]:
    if total is None:
        return {k: v for k, v in usage.items() if isinstance(v, int)}
    completion = total["completion_tokens"] + usage.get("completion_tokens", 0)
    return {
        **total,
        "completion_tokens": completion,
        "total_tokens": total["prompt_tokens"] + completion,
    }
