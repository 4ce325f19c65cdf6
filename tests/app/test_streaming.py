"""A stream that falls behind catches up in one write: tokens already waiting go out together."""

import asyncio
from types import SimpleNamespace

from service_helpers import parse_sse

from app.metrics import Metrics
from app.serving import Done, Job, Service, TokenEvent
from app.streaming import plain_text, sse
from model.engine import Finished, Request, Token
from model.sampling import SamplingParams
from model.tokenizer import CharTokenizer

DONE = Done("length", "abc", {}, {}, 0, "m", "sha")


async def body(response):
    return [chunk async for chunk in response.body_iterator]


def events(*more):
    async def gen():
        for i, m in enumerate(more):
            yield TokenEvent(i, i, "abc"[i], more=m)
        yield DONE

    return gen()


def test_tokens_waiting_behind_one_go_out_in_its_write_and_the_events_stay_whole():
    request = SimpleNamespace(state=SimpleNamespace())
    chunks = asyncio.run(body(sse(events(True, True, False), request)))
    assert len(chunks) == 2  # three tokens in one write, then the done event
    parsed = parse_sse(b"".join(c if isinstance(c, bytes) else c.encode() for c in chunks).decode())
    assert [name for name, _ in parsed] == ["token", "token", "token", "done"]
    assert [data["text"] for _, data in parsed[:3]] == ["a", "b", "c"]
    chunks = asyncio.run(body(sse(events(False, False, False), request)))
    assert len(chunks) == 4  # a client keeping up gets each token as it comes
    text = asyncio.run(body(plain_text(events(True, False, True), request)))
    assert text == ["ab", "c\n"]


def test_a_token_is_marked_more_when_events_already_wait_behind_it():
    service = Service(SimpleNamespace(), Metrics())
    tokenizer = CharTokenizer("abc")
    served = SimpleNamespace(name="m", tokenizer=tokenizer, sha256="sha")

    async def run():
        queue = asyncio.Queue()
        req = Request([0], SamplingParams(max_new_tokens=3), emit=None)
        for event in (Token(0), Token(1), Token(2, last=True), Finished("length")):
            queue.put_nowait((event, 0.0))
        out = [ev async for ev in service._events(served, Job(req, queue))]
        return [ev.more for ev in out[:3]], out[3]

    more, done = asyncio.run(run())
    assert more == [True, True, True]  # the last token too: the Finished waits behind it
    assert done.text == "abc"
