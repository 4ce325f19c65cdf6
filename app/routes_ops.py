"""Liveness, readiness and Prometheus metrics."""
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.errors import error_response

router = APIRouter()


@router.get("/health", summary="The process is alive")
async def health():
    return {"status": "ok"}


@router.get("/ready", summary="Models loaded and warmed up, and not draining")
async def ready(request: Request):
    service = request.app.state.service
    if not service.ready:
        why = "draining" if service.draining else "loading"
        return error_response(503, f"not ready: {why}", "unavailable", headers={"Retry-After": "5"})
    return {"status": "ready", "models": list(service.models)}


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request):
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
