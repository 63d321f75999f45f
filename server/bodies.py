"""Request bodies at the route edge: read once, validated by pydantic, described in OpenAPI.

Routes read their JSON body with `JSONBody` (so that malformed JSON is our OpenAI-shaped
400, not FastAPI's 422) and validate it with the pydantic model that `documented(model)`
also puts in `/openapi.json`, so the schema a client or a fuzzer reads is the one the
server enforces. The chat and completion bodies are vLLM's request models plus
steerserve's fields; the spec itself is validated against the served model's shape when it
is resolved (`applied.py`), by the same `SteeringSpec` model the schema shows.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, Field

from steering.engine import openai_server as vllm_api
from steering.spec import SteeringSpec

from .errors import APIError


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


class RequestSteering(SteeringSpec):
    """A request's `steering`: a spec, plus whether the server's default applies first."""

    default: bool = Field(
        True, description="compose the server's --default-steering before this spec"
    )


class SteerserveFields(BaseModel):
    """What steerserve adds to vLLM's chat and completion bodies."""

    steering: RequestSteering | None = Field(
        None, description="interventions for this request (docs/spec.md)"
    )
    experiment: str | None = Field(
        None, description="A/B experiment to enrol in (or the X-Experiment header)"
    )
    variants: list[SteeringSpec | None] | None = Field(
        None,
        max_length=16,
        description="one choice per spec for the same prompt (null: unsteered)",
    )


class SteeredChatCompletionRequest(vllm_api.ChatCompletionRequest, SteerserveFields):
    """`POST /v1/chat/completions`: vLLM's chat body plus steerserve's fields."""


class SteeredCompletionRequest(vllm_api.CompletionRequest, SteerserveFields):
    """`POST /v1/completions`: vLLM's completion body plus steerserve's fields."""


_DOCUMENTED: dict[str, type[BaseModel]] = {}


def documented(model: type[BaseModel]) -> dict[str, Any]:
    """A route's `openapi_extra`: its JSON body is `model` (a component of the schema)."""
    _DOCUMENTED[model.__name__] = model
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def binary_body(description: str) -> dict[str, Any]:
    """A route's `openapi_extra` for a raw file upload."""
    schema = {"type": "string", "format": "binary"}
    content = {"application/octet-stream": {"schema": schema}}
    return {"requestBody": {"required": True, "description": description, "content": content}}


def add_body_schemas(app: FastAPI) -> None:
    """Make `/openapi.json` carry the models `documented` named (and what they refer to)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, model in _DOCUMENTED.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for def_name, definition in body.pop("$defs", {}).items():
                components.setdefault(def_name, definition)
            components[name] = body
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
