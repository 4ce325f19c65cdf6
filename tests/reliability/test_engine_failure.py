"""An exception injected inside the engine while a full batch decodes and more requests wait."""

import asyncio
import contextlib

import httpx
from service_helpers import metric, parse_sse

from app.main import create_app
from app.settings import Settings

RUNNING, WAITING = 3, 3


@contextlib.asynccontextmanager
async def async_serving(app):
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://quill") as c,
    ):
        yield c


def test_engine_failure_mid_batch_ends_that_batch_with_error_events_and_serves_the_waiting_and_the_next(
    checkpoints, monkeypatch
):
    app = create_app(Settings(_env_file=None, checkpoints=[str(checkpoints["tiny-gpt"])], max_running=RUNNING))
    failed_rows = []

    async def run():
        async with async_serving(app) as c:
            cache = app.state.service.models["tiny-gpt"].engine.cache
            real_decode = cache.decode

            def decode_failing_once_the_batch_is_full(ids):
                if len(ids) == RUNNING and not failed_rows:
                    failed_rows.append(len(ids))
                    raise RuntimeError("injected failure")
                return real_decode(ids)

            monkeypatch.setattr(cache, "decode", decode_failing_once_the_batch_is_full)
            body = {"prompt": "Hello", "max_new_tokens": 40}
            responses = await asyncio.gather(*[c.post("/generate", json=body) for _ in range(RUNNING + WAITING)])
            after = await c.post("/generate", json={**body, "stream": False})
            return responses, after, (await c.get("/metrics")).text

    responses, after, metrics = asyncio.run(run())
    assert failed_rows == [RUNNING]
    assert all(r.status_code == 200 for r in responses)  # every stream had started
    ends = [parse_sse(r.text)[-1] for r in responses]
    errors = [data for name, data in ends if name == "error"]
    done = [data for name, data in ends if name == "done"]
    assert len(errors) == RUNNING  # the batch that failed
    # the exception's text is for the log: the client is told the generation failed, and the request id to ask with
    assert all(e["error"]["message"].startswith("the generation failed; request id ") for e in errors)
    assert all("injected" not in e["error"]["message"] and e["error"]["type"] == "server_error" for e in errors)
    assert len(done) == WAITING and all(d["usage"]["completion_tokens"] == 40 for d in done)  # they ran after it
    assert metric(metrics, "quill_requests_total", route="/generate", status="500") == RUNNING
    assert after.status_code == 200 and after.json()["finish_reason"] == "length"
