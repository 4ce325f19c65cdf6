"""POST /generate: server-sent events, one JSON object, or bare text for terminals."""

from fastapi import APIRouter, Request

from app import streaming
from app.errors import error_responses
from app.protocol import GenerateRequest

router = APIRouter()


@router.post(
    "/generate",
    summary="Generate text from a prompt, streamed as server-sent events",
    responses={**streaming.STREAMED, **error_responses(400, 401, 403, 404, 422, 429, 503)},
)
async def generate(body: GenerateRequest, request: Request):
    _, events = await request.app.state.service.generate(body)
    accept = request.headers.get("accept", "")
    if "text/plain" in accept and "text/event-stream" not in accept:
        return streaming.plain_text(events, request)
    if not body.stream:
        return await streaming.unless_disconnected(request, streaming.collect(events))
    return streaming.sse(events, request)
