"""OpenAI's response shapes for a request of n choices: legacy text completions (with echo and logprobs)
and chat completions, each whole or as streamed chunks. The choices' events come from streaming.merged."""

import json
import time
import uuid
from dataclasses import dataclass, field

from sse_starlette import EventSourceResponse

from app import logprobs
from app.serving import PromptEvent, TokenEvent
from app.streaming import failure_json, merged, until_failure


@dataclass
class Choice:
    """What one choice has gathered: the prompt's and the tokens' logprobs, then its Done."""

    prompt: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    done: object = None


async def gather(streams):
    choices = [Choice() for _ in streams]
    async for i, ev in merged(streams):
        if isinstance(ev, PromptEvent):
            choices[i].prompt = ev.tokens
        elif isinstance(ev, TokenEvent):
            if ev.logprob is not None:
                choices[i].tokens.append(ev.logprob)
        else:
            choices[i].done = ev
    return choices


def usage(dones, n):
    """OpenAI counts each prompt once, however many choices (n of each) share it."""
    prompt = sum(d.usage["prompt_tokens"] for d in dones) // n
    completion = sum(d.usage["completion_tokens"] for d in dones)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def head(kind, served):
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": served.name}


def stream(chunks, request, n, usage_head=None):
    """Server-sent events of `chunks` (an async iterator of (chunk, the choice's Done or None)); a failure
    becomes an error object; with `usage_head`, a last chunk holds the usage (stream_options.include_usage);
    then [DONE]."""

    async def frames():
        dones = []
        async for item in until_failure(chunks, request):
            if not isinstance(item, tuple):  # a GenerationFailed
                yield failure_json(item)
                break
            chunk, done = item
            if done is not None:
                dones.append(done)
            if chunk is not None:
                yield json.dumps(chunk)
        else:
            if usage_head and dones:
                yield json.dumps({**usage_head, "choices": [], "usage": usage(dones, n)})
        yield "[DONE]"

    return EventSourceResponse(frames())


# -- legacy completions --


def legacy_logprobs(body, choice, prompt_chars):
    if body.logprobs is None:
        return None
    prompt = logprobs.legacy(choice.prompt) if body.echo else None
    tokens = logprobs.legacy(choice.tokens, base=prompt_chars if body.echo else 0)
    return {key: prompt[key] + tokens[key] for key in tokens} if prompt else tokens


def prompt_texts(body, served):
    """Each choice's prompt as text (token ids decoded, as their logprobs' text is), in the choices' order: the n
    choices of the first prompt, then of the next."""
    decode = served.tokenizer.decode_bytes
    texts = [p if isinstance(p, str) else decode(p).decode("utf-8", errors="replace") for p in body.prompts()]
    return [text for text in texts for _ in range(body.n)]


async def completion(body, served, streams):
    choices = await gather(streams)
    prompts = prompt_texts(body, served)
    return {
        **head("text_completion", served),
        "choices": [
            {
                "text": (prompts[i] if body.echo else "") + c.done.text,
                "index": i,
                "logprobs": legacy_logprobs(body, c, len(prompts[i])),
                "finish_reason": c.done.finish_reason,
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage([c.done for c in choices], body.n),
    }


def completion_chunks(body, served, streams, request):
    """Each chunk holds one choice, by its index (a list of prompts streams its choices interleaved, as n does)."""
    top = head("text_completion", served)
    prompts = prompt_texts(body, served)

    def chunk(i, text, finish_reason=None, logprobs_=None):
        return {**top, "choices": [{"text": text, "index": i, "logprobs": logprobs_, "finish_reason": finish_reason}]}

    async def chunks():
        if body.echo and body.logprobs is None:  # the echoed prompt comes first (with logprobs: once scored)
            for i in range(len(streams)):
                yield chunk(i, prompts[i]), None
        async for i, ev in merged(streams):
            if isinstance(ev, PromptEvent):
                yield chunk(i, prompts[i], logprobs_=logprobs.legacy(ev.tokens)), None
            elif isinstance(ev, TokenEvent):
                if ev.logprob is not None:
                    base = len(prompts[i]) if body.echo else 0
                    yield chunk(i, ev.text, logprobs_=logprobs.legacy([ev.logprob], base)), None
                elif ev.text:
                    yield chunk(i, ev.text), None
            else:
                yield chunk(i, "", ev.finish_reason), ev

    return stream(chunks(), request, body.n, top if include_usage(body) else None)


def include_usage(body):
    return bool(body.stream_options and body.stream_options.include_usage)


# -- chat completions --


class Reply:
    """A choice's reply text: its leading whitespace dropped (a transcript prompt ends at "Assistant:", and
    the model's reply starts with the space after it)."""

    def __init__(self):
        self.started = False

    def __call__(self, text):
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        return text


async def chat_completion(body, served, streams):
    choices = await gather(streams)
    return {
        **head("chat.completion", served),
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": Reply()(c.done.text), "refusal": None},
                "logprobs": logprobs.chat(c.tokens) if body.logprobs else None,
                "finish_reason": c.done.finish_reason,
            }
            for i, c in enumerate(choices)
        ],
        "usage": usage([c.done for c in choices], body.n),
    }


def chat_chunks(body, served, streams, request):
    top = head("chat.completion.chunk", served)
    replies = [Reply() for _ in streams]

    def chunk(i, delta, finish_reason=None, logprobs_=None):
        return {**top, "choices": [{"index": i, "delta": delta, "logprobs": logprobs_, "finish_reason": finish_reason}]}

    async def chunks():
        for i in range(len(streams)):  # as OpenAI does: the role first, on its own
            yield chunk(i, {"role": "assistant", "content": ""}), None
        async for i, ev in merged(streams):
            if isinstance(ev, TokenEvent):
                text = replies[i](ev.text)
                if ev.logprob is not None:
                    yield chunk(i, {"content": text}, logprobs_=logprobs.chat([ev.logprob])), None
                elif text:
                    yield chunk(i, {"content": text}), None
            elif not isinstance(ev, PromptEvent):
                yield chunk(i, {}, ev.finish_reason), ev

    return stream(chunks(), request, body.n, top if include_usage(body) else None)
