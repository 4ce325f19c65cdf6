"""Assembles the app. `uvicorn app.main:app` serves it; `python -m app` adds flags and draining."""

import asyncio
import contextlib
import logging

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app import routes_generate, routes_openai, routes_ops, routes_playground, routes_tokenize
from app.errors import error_responses, install_error_handlers
from app.metrics import Metrics
from app.middleware import (
    APIKeyMiddleware,
    BodyLimitMiddleware,
    HeaderLimitMiddleware,
    JSONBodyMiddleware,
    MetricsMiddleware,
    RequestIDMiddleware,
    SendTimeoutMiddleware,
)
from app.routes_docs import install_docs
from app.serving import Service
from app.settings import Settings

log = logging.getLogger("quill")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    service = Service(settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not service.models:  # `python -m app` loads them before serving, to report a bad one in one line
            await asyncio.to_thread(service.load)
        if app.state.start_in_background:  # `python -m app`: the port answers at once (/ready: 503 and progress)
            starting = asyncio.create_task(service.start_in_background())
        else:  # TestClient, `uvicorn app.main:app`: serving begins once every model is ready
            await asyncio.to_thread(service.start)
        yield
        await service.drain(0)
        if app.state.start_in_background:
            await starting

    app = FastAPI(
        title="Quill",
        version="0.1.0",
        lifespan=lifespan,
        description="Train a small language model on your own text and stream it over HTTP.",
        responses=error_responses(413, 431, 500),  # any route may send these
        docs_url=None,  # /docs: routes_docs, whose page loads nothing from elsewhere
        redoc_url=None,
    )
    app.state.settings, app.state.metrics, app.state.service = settings, metrics, service
    app.state.start_in_background = False
    install_error_handlers(app)
    for module in (routes_generate, routes_openai, routes_ops, routes_playground, routes_tokenize):
        app.include_router(module.router)
    install_docs(app)
    # added innermost first: metrics sees every response, including refusals by the others
    app.add_middleware(SendTimeoutMiddleware, timeout=settings.send_timeout)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(JSONBodyMiddleware, cors_origins=settings.cors_origins)
    if settings.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key.get_secret_value())
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(HeaderLimitMiddleware, count=settings.max_headers, size=settings.max_header_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIDMiddleware)  # outermost: every response has its id
    return app


def __getattr__(name):
    """`app` for `uvicorn app.main:app`, built when first asked for: importing create_app reads no settings."""
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
