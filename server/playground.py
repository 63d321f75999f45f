"""`GET /playground`: the browser playground and dashboard, served by the API server itself.

Static files shipped in the package (`server/static/playground/`: plain ES modules, no build
step, no CDN, nothing fetched from the network). The page talks to the same server's public
routes with the keys the user types in (kept in the browser's localStorage), so it can do
nothing a curl with those keys could not. Outside `/v1`, so the page itself needs no key.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static" / "playground"

router = APIRouter()


@router.get("/playground", include_in_schema=False)
async def playground() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/playground/", include_in_schema=False)
async def playground_slash() -> RedirectResponse:
    return RedirectResponse("/playground")


# Files under /playground/static/ (StaticFiles refuses paths that leave the directory).
assets = Mount("/playground/static", app=StaticFiles(directory=STATIC), name="playground")
