"""A chat's messages as one prompt: through the checkpoint's chat template (Jinja, as a Hugging Face
tokenizer carries one) when it has one, else Quill's plain transcript; and the strings that end a reply."""

import json
from datetime import datetime
from functools import lru_cache

from jinja2 import TemplateError, TemplateSyntaxError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from app.errors import APIError
from app.protocol import MAX_PROMPT_CHARS

SPEAKERS = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
# where the model, having written the reply, starts another turn of the transcript
TURN_MARKERS = ("\nUser:", "\nSystem:", "\nAssistant:")


def transcript(messages):
    """Quill's plain chat format: one "Speaker: text" turn per message, then "Assistant:" for the reply.

    System: You answer in verse.
    User: Who are you?
    Assistant:
    """
    return "\n".join([*(f"{SPEAKERS[m.role]}: {m.text}" for m in messages), "Assistant:"])


def refuse_template(message):
    raise TemplateError(message)


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: plain JSON, not Jinja's HTML-escaped one (a template's <, > and & stay as written)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compiled(template):
    """The template in the environment Hugging Face's apply_chat_template renders with (its settings, the
    loop controls, its tojson, raise_exception and strftime_now), so a template reads the same here."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = refuse_template
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def chat_prompt(served, messages):
    """(prompt, stop strings) for `messages` on this model; a template that refuses them is a 400."""
    template = served.meta.get("chat_template")
    special = served.meta.get("special_tokens") or {}
    if template:
        try:
            prompt = compiled(template).render(
                messages=[{"role": m.role, "content": m.text} for m in messages],
                add_generation_prompt=True,
                **special,
            )
        except TemplateSyntaxError as e:  # the checkpoint's fault, not the request's
            raise APIError(500, f"the model's chat template does not parse: {e}", type="server_error") from None
        except TemplateError as e:
            raise APIError(400, f"messages: the model's chat template refused them: {e}", param="messages") from None
        except Exception as e:  # a template's own arithmetic on unexpected messages
            message = f"messages: the model's chat template failed on them: {type(e).__name__}: {e}"
            raise APIError(400, message, param="messages") from None
        stop = (special["eos_token"],) if special.get("eos_token") else ()
        if not prompt.strip():
            raise APIError(400, "messages: the model's chat template made an empty prompt of them", param="messages")
    else:
        prompt, stop = transcript(messages), TURN_MARKERS
    if len(prompt) > MAX_PROMPT_CHARS:
        raise APIError(
            400,
            f"messages: the chat's prompt is {len(prompt)} characters, more than {MAX_PROMPT_CHARS}",
            param="messages",
        )
    return prompt, stop
