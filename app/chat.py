"""A chat's messages as one prompt: through the checkpoint's chat template (Jinja, as a Hugging Face
tokenizer carries one) when it has one, else Quill's plain transcript; and the strings that end a reply."""

from functools import lru_cache

from jinja2 import TemplateError
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


@lru_cache(maxsize=16)
def compiled(template):
    # the settings Hugging Face's apply_chat_template renders with, so a template reads the same here
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = refuse_template
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
        except TemplateError as e:
            raise APIError(400, f"messages: the model's chat template refused them: {e}", param="messages") from None
        stop = (special["eos_token"],) if special.get("eos_token") else ()
    else:
        prompt, stop = transcript(messages), TURN_MARKERS
    if len(prompt) > MAX_PROMPT_CHARS:
        raise APIError(
            400,
            f"messages: the chat's prompt is {len(prompt)} characters, more than {MAX_PROMPT_CHARS}",
            param="messages",
        )
    return prompt, stop
