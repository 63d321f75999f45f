"""Experiment routes.

Admin key (`/v1/admin/...`):
    GET  /v1/admin/experiments                 list
    POST /v1/admin/experiments                 create (409 if the name exists)
    PUT  /v1/admin/experiments/{name}          create, or a new version if it changed
    GET  /v1/admin/experiments/{name}          one, with every version
    POST /v1/admin/experiments/{name}/pause | resume | stop
API key:
    POST /v1/feedback                          {"id", "metric", "value"}
    GET  /v1/experiments/{name}/report         ?version=N (default: current)
"""

from __future__ import annotations

import asyncio
import math
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..bodies import JSONBody, documented
from ..errors import APIError, invalid
from ..state import state_of
from .definition import METRIC_PATTERN, ExperimentDef
from .registry import ExperimentRegistry
from .service import Experiments
from .store import ExperimentRecord, Feedback, StoreError

router = APIRouter()

_ACTIONS: dict[str, Literal["running", "paused", "stopped"]] = {
    "pause": "paused",
    "resume": "running",
    "stop": "stopped",
}


def _experiments(request: Request) -> Experiments:
    return state_of(request).experiments


def _describe(record: ExperimentRecord, registry: ExperimentRegistry) -> dict[str, Any]:
    """The stored record, and whether this server serves its current version."""
    live = registry.get(record.name)
    out = {"object": "experiment", **record.summary()}
    out["serving"] = live is not None and live.record.version == record.version
    if live is None and registry.unavailable(record.name):
        out["unavailable"] = registry.unavailable(record.name)
    return out


async def _store_call(coro: Any) -> Any:
    try:
        return await coro
    except StoreError as e:
        raise APIError(e.status, str(e)) from None


def _definition(body: dict, name: str | None = None) -> ExperimentDef:
    if name is not None:
        body = {"name": name, **body}
        if body["name"] != name:
            raise APIError(400, f"name: {body['name']!r} differs from the path's {name!r}", "name")
    try:
        return ExperimentDef.model_validate(body)
    except ValidationError as e:
        raise invalid(e) from None


@router.get("/v1/admin/experiments")
async def list_experiments(request: Request) -> dict[str, Any]:
    exps = _experiments(request)
    records = await asyncio.to_thread(exps.store.all)
    return {"object": "list", "data": [_describe(r, exps.registry) for r in records]}


@router.post("/v1/admin/experiments", openapi_extra=documented(ExperimentDef))
async def create_experiment(request: Request, body: JSONBody) -> JSONResponse:
    exps = _experiments(request)
    record, _ = await _store_call(exps.put(_definition(body), create_only=True))
    return JSONResponse(_describe(record, exps.registry), status_code=201)


@router.put("/v1/admin/experiments/{name}", openapi_extra=documented(ExperimentDef))
async def put_experiment(request: Request, name: str, body: JSONBody) -> JSONResponse:
    exps = _experiments(request)
    record, changed = await _store_call(exps.put(_definition(body, name), create_only=False))
    out = {**_describe(record, exps.registry), "changed": changed}
    return JSONResponse(out, status_code=201 if changed and record.version == 1 else 200)


@router.get("/v1/admin/experiments/{name}")
async def get_experiment(request: Request, name: str) -> dict[str, Any]:
    exps = _experiments(request)
    record = await asyncio.to_thread(exps.store.get, name)
    if record is None:
        raise APIError(404, f"unknown experiment {name!r}", "name")
    versions = await asyncio.to_thread(exps.store.versions, name)
    return {**_describe(record, exps.registry), "versions": versions}


@router.post("/v1/admin/experiments/{name}/{action}")
async def change_status(request: Request, name: str, action: str) -> dict[str, Any]:
    if action not in _ACTIONS:
        raise APIError(404, f"unknown action {action!r} (known: {', '.join(_ACTIONS)})")
    exps = _experiments(request)
    record = await _store_call(exps.set_status(name, _ACTIONS[action]))
    return _describe(record, exps.registry)


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=255)
    metric: str = Field(pattern=METRIC_PATTERN.pattern)
    value: Any

    @field_validator("value")
    @classmethod
    def _number_or_boolean(cls, v: Any) -> bool | float:
        # Strict: "1" or "true" as strings are refused rather than guessed at.
        if isinstance(v, bool):
            return v
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError("must be a finite number or a boolean")
        return float(v)


@router.post("/v1/feedback", openapi_extra=documented(FeedbackBody))
async def post_feedback(request: Request, body: JSONBody) -> dict[str, Any]:
    try:
        fb = FeedbackBody.model_validate(body)
    except ValidationError as e:
        raise invalid(e) from None
    is_bool = isinstance(fb.value, bool)
    item = Feedback(fb.id, fb.metric, float(fb.value), is_bool)
    result = await _experiments(request).feedback(item)
    if result.outcome == "unknown_id":
        raise APIError(404, f"id: {result.message}", "id")
    if result.outcome == "bad_metric":
        raise APIError(400, f"metric: {result.message}", "metric")
    if result.outcome == "conflict":
        raise APIError(
            409, f"value: {result.message}; feedback is recorded once per (id, metric)", "value"
        )
    return {
        "object": "feedback",
        "id": fb.id,
        "metric": fb.metric,
        "value": result.stored,
        "experiment": result.experiment,
        "version": result.version,
        "arm": result.arm,
    }


@router.get("/v1/experiments/{name}/report")
async def experiment_report(
    request: Request, name: str, version: Annotated[int | None, Query(ge=1)] = None
) -> dict[str, Any]:
    return await _store_call(_experiments(request).report(name, version))
