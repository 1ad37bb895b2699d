"""`GET /static/{path}`: the front door's stylesheet and scripts, from this package (never a CDN).

Only the files shipped in services/web/static are served, looked up by exact name:
no path is ever joined with what the browser sent.
"""

from __future__ import annotations

import functools
from pathlib import Path

from litestar import Response, get
from litestar.params import FromPath

from services.auth.declared import Auth, requires
from services.errors import NotFound
from services.openapi import documented

_DIR = Path(__file__).resolve().parent / "static"
_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}


@functools.cache
def _files() -> dict[str, tuple[bytes, str]]:
    return {p.name: (p.read_bytes(), _TYPES[p.suffix]) for p in _DIR.iterdir() if p.suffix in _TYPES}


@get(
    "/static/{path:str}",
    sync_to_thread=False,
    **documented(
        ok=str,
        media_type="text/css",
        errors=(404,),
        ok_description="A file of the web pages: text/css, text/javascript or image/svg+xml",
    ),
    **requires(Auth.PUBLIC),
)
def static_file(path: FromPath[str]) -> Response[bytes]:
    found = _files().get(path)
    if found is None:
        raise NotFound(f"No static file {path[:64]!r}.")
    body, media_type = found
    return Response(
        content=body,
        media_type=media_type,
        headers={"cache-control": "public, max-age=300", "x-content-type-options": "nosniff"},
    )
