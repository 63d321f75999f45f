"""`GET /v1/vectors`, `GET /v1/presets` and `POST /v1/admin/reload`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from steering.engine.frontend import SteeringFrontend, SteeringValidationError
from steering.vectors import SteeringVector

from .errors import APIError
from .settings import SettingsError, load_presets
from .state import state_of

router = APIRouter()


def _frontend(request: Request) -> SteeringFrontend:
    frontend = state_of(request).frontend
    if frontend is None:
        raise APIError(404, "steering is disabled on this server")
    return frontend


def _describe(name: str, vector: SteeringVector, frontend: SteeringFrontend) -> dict[str, Any]:
    problem = vector.fits(frontend.shape, vector.site)
    return {
        "id": name,
        "object": "steering.vector",
        "site": vector.site,
        "layers": vector.layers,
        "hidden_size": vector.hidden_size,
        "num_heads": vector.num_heads,
        "head_dim": vector.head_dim,
        "architecture": vector.architecture,
        "method": vector.method,
        "description": vector.description,
        "metadata": dict(vector.extra),
        "usable": problem is None,
        "problem": problem,
    }


@router.get("/v1/vectors")
async def list_vectors(request: Request) -> dict[str, Any]:
    frontend = _frontend(request)
    registry = frontend.registry
    return {
        "object": "list",
        "data": [_describe(n, v, frontend) for n, v in sorted(registry.vectors.items())],
        "skipped_files": dict(registry.errors),
    }


@router.get("/v1/presets")
async def list_presets(request: Request) -> dict[str, Any]:
    state = state_of(request)
    presets = state.frontend.context.presets if state.frontend is not None else {}
    return {
        "object": "list",
        "data": [{"id": n, "object": "steering.preset", "spec": s} for n, s in presets.items()],
        "default": state.settings.default_spec,
    }


@router.post("/v1/admin/reload")
async def reload(request: Request) -> dict[str, Any]:
    """Re-read the vectors directory and the presets file; all or nothing for presets.

    Running requests keep the vectors they were compiled with.
    """
    state = state_of(request)
    frontend = _frontend(request)
    frontend.registry.reload()
    try:
        presets = load_presets(state.settings.presets_path)
        check_presets(frontend, presets)
    except (SettingsError, SteeringValidationError) as e:
        raise APIError(400, f"vectors reloaded, presets not: {e}") from None
    frontend.context.presets = presets
    return {
        "vectors": sorted(frontend.registry.vectors),
        "skipped_files": dict(frontend.registry.errors),
        "presets": sorted(presets),
    }


def check_presets(frontend: SteeringFrontend, presets: dict[str, dict]) -> None:
    """Each preset must parse and compile against the served model."""
    for name, spec in presets.items():
        try:
            frontend.compile(frontend.parse(spec))
        except SteeringValidationError as e:
            raise SteeringValidationError(
                [(f"preset {name!r}: {loc.removeprefix('steering')}", msg) for loc, msg in e.errors]
            ) from None
