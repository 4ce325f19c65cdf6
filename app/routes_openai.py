"""OpenAI-compatible POST /v1/completions and GET /v1/models."""
import json
import time
import uuid

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from app.errors import error_body, error_responses
from app.protocol import CompletionRequest
from app.routes_generate import STREAMED, collect
from app.serving import GenerationFailed, TokenEvent

router = APIRouter(prefix="/v1")


def choice(text, finish_reason):
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}


@router.post("/completions", summary="OpenAI-compatible text completion",
             responses={**STREAMED, **error_responses(400, 401, 403, 404, 422, 429, 503)})
async def completions(body: CompletionRequest, request: Request):
    service = request.app.state.service
    served = service.get(body.model)
    events = service.generate(served, body.prompt, body.to_sampling_params())
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": served.name}
    if not body.stream:
        final = await collect(events)
        return {**head, "choices": [choice(final["text"], final["finish_reason"])], "usage": final["usage"]}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def chunks():
        try:
            async for ev in events:
                if isinstance(ev, TokenEvent):
                    if ev.text:
                        yield json.dumps({**head, "choices": [choice(ev.text, None)]})
                    continue
                yield json.dumps({**head, "choices": [choice("", ev["finish_reason"])]})
                if include_usage:
                    yield json.dumps({**head, "choices": [], "usage": ev["usage"]})
        except GenerationFailed as e:
            request.state.failed = True
            yield json.dumps(error_body(e.message, e.type, code=e.code))
        yield "[DONE]"

    return EventSourceResponse(chunks())


@router.get("/models", summary="The models this server serves", responses=error_responses(401))
async def models(request: Request):
    service = request.app.state.service
    return {"object": "list", "data": [
        {"id": m.name, "object": "model", "created": int(m.path.stat().st_mtime), "owned_by": "quill",
         "model_type": m.meta["model_type"], "checkpoint_sha256": m.sha256}
        for m in service.models.values()]}
