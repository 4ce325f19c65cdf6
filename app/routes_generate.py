"""POST /generate: server-sent events, one JSON object, or bare text for terminals."""
import json

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from sse_starlette import EventSourceResponse

from app.errors import APIError, error_body, error_responses
from app.protocol import GenerateRequest
from app.serving import GenerationFailed, TokenEvent

router = APIRouter()
# Besides JSON, a 200 can be server-sent events (the schema is one event's) or bare text; both are documented.
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}
STREAMED = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT},
                              "text/plain": {"schema": {"type": "string"}}}}}


async def sse_events(events, request):
    try:
        async for ev in events:
            if isinstance(ev, TokenEvent):
                yield {"event": "token", "data": json.dumps({"index": ev.index, "id": ev.id, "text": ev.text})}
            else:
                yield {"event": "done", "data": json.dumps(ev)}
    except GenerationFailed as e:
        request.state.failed = True
        yield {"event": "error", "data": json.dumps(error_body(e.message, e.type, code=e.code))}


async def text_chunks(events, request):
    try:
        async for ev in events:
            if isinstance(ev, TokenEvent):
                if ev.text:
                    yield ev.text
            else:
                yield "\n"
    except GenerationFailed as e:
        request.state.failed = True
        yield f"\n[error: {e.message}]\n"


async def collect(events):
    try:
        async for ev in events:
            if not isinstance(ev, TokenEvent):
                return ev
    except GenerationFailed as e:
        raise APIError(e.status, e.message, type=e.type, headers=e.headers) from None


@router.post("/generate", summary="Generate text from a prompt, streamed as server-sent events",
             responses={**STREAMED, **error_responses(400, 401, 403, 404, 422, 429, 503)})
async def generate(body: GenerateRequest, request: Request):
    service = request.app.state.service
    served = service.get(body.model)
    events = service.generate(served, body.prompt, body.to_sampling_params())
    accept = request.headers.get("accept", "")
    if "text/plain" in accept and "text/event-stream" not in accept:
        return StreamingResponse(text_chunks(events, request), media_type="text/plain; charset=utf-8")
    if not body.stream:
        return await collect(events)
    return EventSourceResponse(sse_events(events, request))
