"""`GET /v1/steering/capabilities`: the served model's steering sites and the spec fields this
server accepts (`steering/capabilities.py` builds the document)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from steering.capabilities import describe
from steering.spec import ModelShape, SpecContext

from .state import state_of

router = APIRouter()


@router.get("/v1/steering/capabilities")
async def capabilities(request: Request) -> dict[str, Any]:
    state = state_of(request)
    frontend = state.frontend
    if frontend is not None:
        return describe(state.metrics.model_name, frontend.context, frontend.config)
    shape = ModelShape.from_hf_config(state.engine.model_config.hf_config)
    return describe(state.metrics.model_name, SpecContext(shape), None)
