"""Sparse autoencoders: `GET /v1/saes[/{name}]`, `GET /v1/saes/{name}/features/{feature}`,
`PUT`/`DELETE /v1/saes/{name}` (admin key, as for vectors).

An upload is any file `steering.sae.parse_upload` reads (our .safetensors, a Gemma Scope
params.npz / .safetensors with `?layer=`, or a .zip of an SAELens, sparsify or Gemma Scope
directory); it is validated against the served model and stored in our format. As with
vectors, a stored or deleted SAE takes effect for the next request: running requests keep
the feature rows they were compiled with.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from steering.engine.frontend import SteeringFrontend
from steering.sae import SparseAutoencoder, save_sae, valid_name

from .bodies import binary_body
from .errors import APIError
from .state import state_of

router = APIRouter()

NEIGHBOURS = 10


def _frontend(request: Request) -> SteeringFrontend:
    frontend = state_of(request).frontend
    if frontend is None:
        raise APIError(404, "steering is disabled on this server")
    return frontend


def _threshold_summary(sae: SparseAutoencoder) -> dict[str, float] | None:
    if sae.threshold is None:
        return None
    t = sae.threshold.astype(np.float64)
    return {"min": float(t.min()), "mean": float(t.mean()), "max": float(t.max())}


def _describe(name: str, sae: SparseAutoencoder, frontend: SteeringFrontend) -> dict[str, Any]:
    problem = sae.fits(frontend.shape)
    return {
        "id": name,
        "object": "steering.sae",
        "layer": sae.layer,
        "hidden_size": sae.hidden_size,
        "width": sae.width,
        "activation": sae.activation,
        "k": sae.k,
        "threshold": _threshold_summary(sae),
        "subtract_b_dec": sae.subtract_b_dec,
        "source_format": sae.source_format,
        "architecture": sae.architecture,
        "description": sae.description,
        "labels": {str(f): label for f, label in sorted(sae.labels.items())},
        "has_typical": sae.typical is not None,
        "metadata": dict(sae.extra),
        "usable": problem is None,
        "problem": problem,
    }


def _not_the_topk_sae(frontend: SteeringFrontend, name: str) -> None:
    # The engine's workers loaded its full encoder at start; a new file under the name
    # would make top-k readout read one SAE while the feature entries name another.
    if name == frontend.config.topk_sae:
        raise APIError(
            409,
            f"name: SAE {name!r} is this server's top-k readout SAE (--steering-topk-sae), "
            "which the engine loaded at start; restart the server to replace or delete it",
            "name",
        )


def _sae(frontend: SteeringFrontend, name: str) -> SparseAutoencoder:
    registry = frontend.saes
    sae = registry.saes.get(name)
    if sae is not None:
        return sae
    # A file of that name that failed to load: say why, rather than "unknown".
    for file, reason in registry.errors.items():
        if Path(file).stem == name or file == name:
            raise APIError(404, f"SAE {name!r} failed to load ({file}: {reason})", "name")
    raise APIError(404, f"unknown SAE {name!r}", "name")


@router.get("/v1/saes")
async def list_saes(request: Request) -> dict[str, Any]:
    frontend = _frontend(request)
    registry = frontend.saes
    return {
        "object": "list",
        "data": [_describe(n, s, frontend) for n, s in sorted(registry.saes.items())],
        "skipped_files": dict(registry.errors),
    }


@router.get("/v1/saes/{name}")
async def get_sae(
    request: Request,
    name: str,
    format: Annotated[Literal["json", "safetensors"], Query()] = "json",  # noqa: A002
) -> Any:
    """The SAE's description, or (`?format=safetensors`) the SAE as our file."""
    frontend = _frontend(request)
    sae = _sae(frontend, name)
    if format == "json":
        return _describe(name, sae, frontend)

    def write() -> bytes:
        with tempfile.TemporaryDirectory() as d:
            return save_sae(sae, Path(d) / f"{name}.safetensors").read_bytes()

    content = await asyncio.to_thread(write)
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{name}.safetensors"'},
    )


def _feature(name: str, sae: SparseAutoencoder, feature: int) -> dict[str, Any]:
    row = sae.decoder_row(feature).astype(np.float64)
    norm = float(np.linalg.norm(row))
    neighbours: list[dict[str, Any]] = []
    if norm > 0 and sae.width > 1:
        norms = np.linalg.norm(sae.w_dec.astype(np.float64), axis=1)
        dots = sae.w_dec.astype(np.float64) @ row
        # Dead features have zero decoder rows: no direction, so no similarity either.
        cosines = np.divide(dots, norms * norm, out=np.zeros_like(dots), where=norms > 0)
        cosines[feature] = -np.inf
        count = min(NEIGHBOURS, sae.width - 1)
        top = np.argpartition(-cosines, count - 1)[:count]
        top = top[np.argsort(-cosines[top], kind="stable")]
        neighbours = [
            {"feature": int(f), "cosine": float(cosines[f]), "label": sae.label(int(f))}
            for f in top
        ]
    typical = float(sae.typical[feature]) if sae.typical is not None else None
    return {
        "id": name,
        "object": "steering.sae.feature",
        "feature": feature,
        "layer": sae.layer,
        "label": sae.label(feature),
        "typical": typical,
        "encoder_offset": sae.encoder_offset(feature),
        "encoder_norm": float(np.linalg.norm(sae.encoder_row(feature).astype(np.float64))),
        "threshold": sae.feature_threshold(feature),
        "decoder_norm": norm,
        "neighbours": neighbours,
    }


@router.get("/v1/saes/{name}/features/{feature}")
async def get_feature(request: Request, name: str, feature: int) -> dict[str, Any]:
    """One feature: its label, encoder offset and threshold, decoder norm, and the
    features whose decoder directions are closest to its own (cosine)."""
    frontend = _frontend(request)
    sae = _sae(frontend, name)
    if not 0 <= feature < sae.width:
        raise APIError(
            404,
            f"feature: {feature} is out of range for SAE {name!r} (0..{sae.width - 1})",
            "feature",
        )
    # A product with the whole decoder: off the event loop for wide SAEs.
    return await asyncio.to_thread(_feature, name, sae, feature)


@router.put(
    "/v1/saes/{name}",
    openapi_extra=binary_body(
        "an SAE: our .safetensors, a Gemma Scope params.npz / .safetensors (with ?layer=), "
        "or a .zip of an SAELens, sparsify or Gemma Scope directory"
    ),
)
async def put_sae(
    request: Request,
    name: str,
    layer: Annotated[
        int | None,
        Query(ge=0, description="the layer it reads, for files that do not record it"),
    ] = None,
) -> Response:
    """Store the body (any SAE file steerserve reads) as SAE `name`, in our format."""
    state = state_of(request)
    frontend = _frontend(request)
    if not valid_name(name):
        raise APIError(
            400,
            f"name: {name!r} is not a valid SAE name (letters, digits, '_', '.', '-'; at most 128)",
            "name",
        )
    if layer is not None and layer >= frontend.shape.num_layers:
        raise APIError(
            400,
            f"layer: {layer} is out of range (the model has {frontend.shape.num_layers} layers)",
            "layer",
        )
    _not_the_topk_sae(frontend, name)
    data = await request.body()
    if not data:
        raise APIError(400, "the body must be an SAE file (.safetensors, .npz or .zip)")
    try:
        sae, replaced = await asyncio.to_thread(
            frontend.saes.store, name, data, frontend.shape, layer
        )
    except ValueError as e:
        raise APIError(400, str(e)) from None
    await asyncio.to_thread(state.experiments.registry.reload)
    body = {**_describe(name, sae, frontend), "replaced": replaced}
    return JSONResponse(body, status_code=200 if replaced else 201)


@router.delete("/v1/saes/{name}")
async def delete_sae(request: Request, name: str) -> dict[str, Any]:
    state = state_of(request)
    frontend = _frontend(request)
    _not_the_topk_sae(frontend, name)
    try:
        await asyncio.to_thread(frontend.saes.delete, name)
    except KeyError:
        raise APIError(404, f"unknown SAE {name!r}", "name") from None
    # Experiments whose arms use its features stop enrolling (and say why).
    await asyncio.to_thread(state.experiments.registry.reload)
    return {"id": name, "object": "steering.sae", "deleted": True}
