"""GET /: the browser playground, one static page and its two assets. No build step, nothing
fetched from elsewhere; the page speaks to the same API as any other client."""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parent / "static"
# Only these files, by exact path: nothing else under static/ can be asked for.
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    "/static/playground.css": ("playground.css", "text/css; charset=utf-8"),
}
PLAYGROUND_PATHS = frozenset(ASSETS)  # they hold no data, so they need no API key (the page asks for it)
HEADERS = {
    # The page runs only its own script and talks only to this server.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # revalidate, so a new version of the page is seen at once
}

router = APIRouter(include_in_schema=False)


def serve(filename, media_type):
    async def asset():
        return FileResponse(STATIC / filename, media_type=media_type, headers=HEADERS)

    return asset


for path, (filename, media_type) in ASSETS.items():
    router.add_api_route(path, serve(filename, media_type), methods=["GET"])
