"""GET /docs: FastAPI's Swagger UI page, with its script and styles served by this server from the files the
fastapi-offline package ships rather than from a CDN, so that it works offline and behind a firewall. FastAPI's
documented way: its default page turned off, get_swagger_ui_html pointed at files mounted here. (ReDoc, FastAPI's
/redoc, is not served: its page fetches a logo from its maker's site whatever it is given.)"""

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.staticfiles import StaticFiles

ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"  # Swagger UI 5 and FastAPI's favicon
ASSETS_URL = "/docs/assets"


def install_docs(app: FastAPI):
    """Serve /docs and its assets; `app` must be made with docs_url=None and redoc_url=None."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request):
        root = request.scope.get("root_path", "")  # behind a proxy that strips a prefix, the links keep it
        return get_swagger_ui_html(
            openapi_url=root + app.openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            # Swagger UI would ask validator.swagger.io about the schema (with its address) from any host but localhost
            swagger_ui_parameters={"validatorUrl": None},
        )
