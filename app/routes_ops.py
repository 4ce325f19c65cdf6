"""Liveness, readiness and Prometheus metrics."""

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.errors import error_body, error_response, error_responses

router = APIRouter()


@router.get(
    "/health", summary="The process is alive, and its engines have not given up", responses=error_responses(503)
)
async def health(request: Request):
    failed = request.app.state.service.failed
    if failed:  # a crash loop: restarting the whole server (compose's restart policy, Kubernetes) is what is left
        return error_response(503, f"unhealthy: {failed}", "unavailable", code="engine_failed")
    return {"status": "ok"}


@router.get(
    "/ready",
    summary="Models loaded and warmed up, every engine up, and not draining",
    responses=error_responses(503),
)
async def ready(request: Request):
    service = request.app.state.service
    if service.failed:
        retry = {"Retry-After": "5"}
        return error_response(503, f"not ready: {service.failed}", "unavailable", headers=retry, code="engine_failed")
    if not service.ready and not service.draining:  # starting: each model's progress beside the error
        body = error_body("not ready: starting", "unavailable", code="server_starting") | {"models": service.status()}
        return JSONResponse(body, 503, headers={"Retry-After": "5"})
    why = "draining" if service.draining else service.unavailable()
    if why:
        code = "server_shutdown" if service.draining else "model_unavailable"
        return error_response(503, f"not ready: {why}", "unavailable", headers={"Retry-After": "5"}, code=code)
    # and each GPT's compiled decode step: the batch sizes built so far (in the background) and planned
    compiled = {m.name: m.engine.compiled_sizes() for m in service.models.values()}
    compiled = {name: {"compiled_batch_sizes": c[0], "batch_sizes": c[1]} for name, c in compiled.items() if c}
    return {"status": "ready", "models": list(service.models), "compiled": compiled}


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse, responses=error_responses(401))
async def metrics(request: Request):
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
