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
import logging
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from steering.engine import openai_server as vllm_api

from . import pipeline
from .applied import Applied
from .bodies import JSONBody, SteeredChatCompletionRequest, SteeredCompletionRequest, documented
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


@router.post("/v1/chat/completions", openapi_extra=documented(SteeredChatCompletionRequest))
@vllm_api.with_cancellation
async def create_chat_completion(raw_request: Request, body: JSONBody):
    return await _serve(raw_request, body, chat=True)


@router.post("/v1/completions", openapi_extra=documented(SteeredCompletionRequest))
@vllm_api.with_cancellation
async def create_completion(raw_request: Request, body: JSONBody):
    return await _serve(raw_request, body, chat=False)


async def _serve(raw_request: Request, body: dict, *, chat: bool) -> Response:
    state = state_of(raw_request)
    if "variants" in body:
        from .variants import VariantsCall

        return await pipeline.serve(VariantsCall(state, raw_request, body, chat=chat))
    return await pipeline.serve(SteeredCall(state, raw_request, body, chat=chat))


class SteeredCall(pipeline.Call):
    """One request with its own steering, and its experiment arm's if it is enrolled."""

    track: Track
    applied: Applied
    enrollment: Enrollment | None = None
    recorded: Recorded | None = None

    def prepare(self) -> list[Any]:
        self.track = Track()
        self.tracks = [self.track]
        request, self.applied, self.enrollment = _parse(
            self.state, self.raw_request, self.body, chat=self.chat
        )
        self.request = request
        self.track.n = request.n or 1
        self.track.labels = self.state.metrics.labels(self.applied.preset, self.applied.kind)
        if self.applied.reads:
            self.track.readout = RequestReadout(
                self.state.readouts, self.applied.spec.readout, self.track.n
            )
        self.state.metrics.running.labels(**self.track.labels).inc()
        self.headers = {FINGERPRINT_HEADER: self.applied.fingerprint or "none"}
        if self.enrollment is not None:
            self.headers.update(self.enrollment.headers())
        return [request]

    @property
    def sequences(self) -> int:
        return self.track.n * prompt_count(self.request, chat=self.chat)

    def admitted(self) -> None:
        enrollment = self.enrollment
        if enrollment is not None and enrollment.arm is not None:
            rid = vllm_api.response_id(self.raw_request, self.request, chat=self.chat)
            durable = self.state.experiments.record(enrollment, rid, self.request.model)
            self.recorded = Recorded(enrollment, rid, durable)

    async def whole(self, results: list[Any]) -> dict[str, Any]:
        content = results[0].model_dump()
        content["steering"] = await self._echo()
        if self.track.readout is not None:
            for choice in content["choices"]:
                choice["readout"] = self.track.readout.whole(choice["index"])
        if self.recorded is not None:
            _check_id(self.recorded, content.get("id"))
            if not await self.recorded.wait():
                self.headers["x-experiment-recorded"] = "false"
        return content

    def event(self, index: int, data: dict[str, Any]) -> dict[str, Any]:
        if self.track.readout is not None:
            for choice in data.get("choices", []):
                values = self.track.readout.delta(choice["index"])
                if values is not None:
                    choice["readout"] = values
        if self.first_event(data):
            if self.recorded is not None:
                _check_id(self.recorded, data.get("id"))
            data = {"steering": self._head_echo(), **data}
        return data

    async def tail(self) -> list[dict[str, Any]]:
        events = []
        if self.track.readout is not None:
            rest = rest_of_stream(self.track.readout, chat=self.chat)
            if rest:
                events.append(self.headed(choices=rest))
        if self.applied.reports_at_end:
            events.append(self.headed(choices=[], steering=await self._echo()))
        if self.recorded is not None:
            await self.recorded.wait()
        return events

    def end(self, status: int) -> None:
        track = self.track
        latency = finish(self.state, track, status)
        recorded = self.recorded
        if recorded is not None:
            self.state.experiments.finish(
                recorded.enrollment,
                recorded.response_id,
                status,
                track.prompt_tokens,
                track.generation_tokens,
                track.ttft,
                latency,
            )

    def _head_echo(self) -> dict[str, Any]:
        echo = self.applied.echo()
        if self.enrollment is not None:
            echo.update(self.enrollment.echo())
        return echo

    async def _echo(self) -> dict[str, Any]:
        echo = self._head_echo()
        if self.applied.reports_decoding:
            echo["decoding"]["choices"] = await decoding_reports(self.state, self.track)
        if self.applied.reports_conditions:
            echo["conditions"]["choices"] = await condition_reports(self.state, self.track)
        return echo


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
            unit=_header_text(raw_request, UNIT_HEADER) or request.user,
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
    header = _header_text(raw_request, EXPERIMENT_HEADER)
    if field is not None and not isinstance(field, str):
        raise APIError(400, "experiment: must be an experiment's name", "experiment")
    if field is not None and header is not None and field != header:
        raise APIError(
            400,
            f"experiment: {field!r} differs from the X-Experiment header {header!r}",
            "experiment",
        )
    return field if field is not None else header


def _header_text(raw_request: Request, name: str) -> str | None:
    """A header's value as the text the client sent: HTTP carries bytes, which Starlette
    decodes as latin-1, while clients (httpx, requests, browsers) send UTF-8. Without
    this a unit "Zoë" in X-Unit-Id would hash as "ZoÃ«" and get another arm than the same
    unit sent as `user`."""
    value = raw_request.headers.get(name)
    if value is None:
        return None
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:  # not UTF-8: the bytes as latin-1 text, as received
        return value


def _check_id(recorded: Recorded, actual: str | None) -> None:
    if actual != recorded.response_id:  # vLLM changed how it names responses
        log.error(
            "response id %s recorded as %s: feedback on it will not be found",
            actual,
            recorded.response_id,
        )
