"""Vectors and presets: `GET /v1/vectors[/{name}]`, `PUT`/`DELETE /v1/vectors/{name}`
(admin key), `GET /v1/presets` and `POST /v1/admin/reload`.

A stored or deleted vector takes effect for the next request; running requests keep the
vectors they were compiled with (a compiled spec carries its vector data to the engine).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from steering.engine.frontend import SteeringFrontend, SteeringValidationError
from steering.vectors import (
    SteeringVector,
    VectorFileError,
    export_gguf,
    save_vector,
    valid_name,
)

from .bodies import binary_body
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


def _vector(frontend: SteeringFrontend, name: str) -> SteeringVector:
    vector = frontend.registry.vectors.get(name)
    if vector is None:
        raise APIError(404, f"unknown vector {name!r}", "name")
    return vector


@router.get("/v1/vectors/{name}")
async def get_vector(
    request: Request,
    name: str,
    format: Annotated[Literal["json", "safetensors", "gguf"], Query()] = "json",  # noqa: A002
) -> Any:
    """The vector's description, or (`?format=safetensors|gguf`) the vector as a file."""
    frontend = _frontend(request)
    vector = _vector(frontend, name)
    if format == "json":
        return _describe(name, vector, frontend)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{name}.{format}"
        try:
            if format == "gguf":
                export_gguf(vector, path)
            else:
                save_vector(vector, path)
        except VectorFileError as e:
            raise APIError(400, f"format: {e}", "format") from None
        content = path.read_bytes()
    disposition = f'attachment; filename="{path.name}"'
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Content-Disposition": disposition},
    )


@router.put(
    "/v1/vectors/{name}",
    openapi_extra=binary_body("a GGUF control vector (llama.cpp, repeng) or a .safetensors vector"),
)
async def put_vector(request: Request, name: str) -> Response:
    """Store the body (a GGUF control vector or our safetensors file) as vector `name`."""
    state = state_of(request)
    frontend = _frontend(request)
    if not valid_name(name):
        raise APIError(
            400,
            f"name: {name!r} is not a valid vector name (letters, digits, "
            "'_', '.', '-'; at most 128)",
            "name",
        )
    data = await request.body()
    if not data:
        raise APIError(400, "the body must be a .safetensors or .gguf vector file")
    try:
        vector, replaced = await asyncio.to_thread(
            frontend.registry.store, name, data, frontend.shape
        )
    except ValueError as e:
        raise APIError(400, str(e)) from None
    await asyncio.to_thread(state.experiments.registry.reload)
    body = {**_describe(name, vector, frontend), "replaced": replaced}
    return JSONResponse(body, status_code=200 if replaced else 201)


@router.delete("/v1/vectors/{name}")
async def delete_vector(request: Request, name: str) -> dict[str, Any]:
    state = state_of(request)
    frontend = _frontend(request)
    try:
        await asyncio.to_thread(frontend.registry.delete, name)
    except KeyError:
        raise APIError(404, f"unknown vector {name!r}", "name") from None
    # Experiments whose arms use it stop enrolling (and say why); presets fail per request.
    await asyncio.to_thread(state.experiments.registry.reload)
    return {"id": name, "object": "steering.vector", "deleted": True}


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
    """Re-read the vectors and SAE directories and the presets file; all or nothing for
    presets.

    Running requests keep the vectors and features they were compiled with.
    """
    state = state_of(request)
    frontend = _frontend(request)
    await asyncio.to_thread(frontend.registry.reload)
    await asyncio.to_thread(frontend.reload_saes)
    try:
        presets = load_presets(state.settings.presets_path)
        check_presets(frontend, presets)
    except (SettingsError, SteeringValidationError) as e:
        raise APIError(400, f"vectors reloaded, presets not: {e}") from None
    frontend.context.presets = presets
    return {
        "vectors": sorted(frontend.registry.vectors),
        "skipped_files": dict(frontend.registry.errors),
        "saes": frontend.saes.names(),
        "skipped_sae_files": dict(frontend.saes.errors),
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
