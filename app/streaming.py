"""A generation's events (TokenEvents, then a Done) in each shape /generate offers: server-sent events,
bare text, one JSON object; and the merging of an n-choice request's streams (app.completions shapes
OpenAI's). The routes only pick one."""

import asyncio
import json
import logging

from sse_starlette import EventSourceResponse
from starlette.responses import StreamingResponse

from app.errors import client_message, error_body, request_id
from app.serving import GenerationFailed, TokenEvent

log = logging.getLogger("quill")

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
    """The events; a GenerationFailed, or any other exception, becomes the last item (a GenerationFailed whose
    message is the client's: errors.client_message) and marks the request failed for the metrics, since a stream
    under way can only end with an error in its own format, never a cut connection."""
    try:
        async for ev in events:
            yield ev
    except GenerationFailed as e:
        request.state.failed = True
        yield GenerationFailed(client_message(e, request), e.status, e.type, e.code)
    except Exception:
        request.state.failed = True
        rid = request_id(request)
        log.exception("request %s: the stream failed", rid)
        yield GenerationFailed(f"internal server error; request id {rid}")


def failure_json(e):
    return json.dumps(error_body(e.message, e.type, code=e.code))


def token_json(ev):
    out = {"index": ev.index, "id": ev.id, "text": ev.text}
    if ev.logprob is not None:
        out["logprob"] = ev.logprob.logprob
        out["top_logprobs"] = [{"id": a.id, "text": a.text, "logprob": a.logprob} for a in ev.logprob.top]
    return out


def sse(events, request):
    async def frames():
        async for ev in until_failure(events, request):
            if isinstance(ev, TokenEvent):
                yield {"event": "token", "data": json.dumps(token_json(ev))}
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


async def unless_disconnected(request, awaitable, every=0.25):
    """The result of `awaitable`, a whole (non-streamed) response in the making; if the client leaves first, it is
    cancelled, so that its requests leave the engine (each event stream's `finally`), and None is returned:
    nobody is left to read it."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=every)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        task.cancel()


async def collect(events):
    """The Done, with the tokens' logprobs when asked for; a GenerationFailed propagates to the app's error
    handler (nothing was sent yet)."""
    logprobs = []
    async for ev in events:
        if isinstance(ev, TokenEvent):
            if ev.logprob is not None:
                logprobs.append(token_json(ev))
        else:
            return {**ev.to_dict(), "logprobs": logprobs} if logprobs else ev.to_dict()


async def merged(streams):
    """(choice index, event) from the event streams of an n-choice request, as they come. A GenerationFailed
    in any ends it; closing it closes every stream, so their requests leave the engine."""
    if len(streams) == 1:  # no tasks and no queue on the common path
        async for ev in streams[0]:
            yield 0, ev
        return
    queue = asyncio.Queue()

    async def pump(i, events):
        try:
            async for ev in events:
                queue.put_nowait((i, ev))
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, events)) for i, events in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, ev = await queue.get()
            if ev is None:
                left -= 1
            elif isinstance(ev, Exception):
                raise ev
            else:
                yield i, ev
    finally:
        for task in tasks:
            task.cancel()
