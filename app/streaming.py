"""A generation's events (TokenEvents, then a Done) in each shape a client asks for: server-sent
events, bare text, one JSON object, OpenAI completion chunks. The routes only pick one."""

import json
import time
import uuid

from sse_starlette import EventSourceResponse
from starlette.responses import StreamingResponse

from app.errors import error_body
from app.serving import GenerationFailed, TokenEvent

# Besides JSON, a 200 can be server-sent events (the schema is one event's) or bare text; both are documented.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
}
STREAMED = {
    200: {"content": {"text/event-stream": {"schema": SSE_EVENT}, "text/plain": {"schema": {"type": "string"}}}}
}


async def until_failure(events, request):
    """The events; a GenerationFailed becomes the last item (and marks the request failed for the metrics),
    since a stream under way can only end with an error in its own format."""
    try:
        async for ev in events:
            yield ev
    except GenerationFailed as e:
        request.state.failed = True
        yield e


def failure_json(e):
    return json.dumps(error_body(e.message, e.type, code=e.code))


def sse(events, request):
    async def frames():
        async for ev in until_failure(events, request):
            if isinstance(ev, TokenEvent):
                yield {"event": "token", "data": json.dumps({"index": ev.index, "id": ev.id, "text": ev.text})}
            elif isinstance(ev, GenerationFailed):
                yield {"event": "error", "data": failure_json(ev)}
            else:
                yield {"event": "done", "data": json.dumps(ev.to_dict())}

    return EventSourceResponse(frames())


def plain_text(events, request):
    async def chunks():
        async for ev in until_failure(events, request):
            if isinstance(ev, TokenEvent):
                if ev.text:
                    yield ev.text
            elif isinstance(ev, GenerationFailed):
                yield f"\n[error: {ev.message}]\n"
            else:
                yield "\n"

    return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8")


async def collect(events):
    """The Done; a GenerationFailed propagates to the app's error handler (nothing was sent yet)."""
    async for ev in events:
        if not isinstance(ev, TokenEvent):
            return ev


def completion_head(served):
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": served.name,
    }


def choice(text, finish_reason):
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}


async def completion(events, served):
    done = await collect(events)
    return {**completion_head(served), "choices": [choice(done.text, done.finish_reason)], "usage": done.usage}


def completion_chunks(events, request, served, include_usage):
    head = completion_head(served)

    async def chunks():
        async for ev in until_failure(events, request):
            if isinstance(ev, TokenEvent):
                if ev.text:
                    yield json.dumps({**head, "choices": [choice(ev.text, None)]})
            elif isinstance(ev, GenerationFailed):
                yield failure_json(ev)
            else:
                yield json.dumps({**head, "choices": [choice("", ev.finish_reason)]})
                if include_usage:
                    yield json.dumps({**head, "choices": [], "usage": ev.usage})
        yield "[DONE]"

    return EventSourceResponse(chunks())
