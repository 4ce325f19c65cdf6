"""Request bodies and their bounds: the one place that knows each limit."""

import dataclasses
import secrets
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from model.sampling import SamplingParams

MAX_PROMPT_CHARS = 16_000  # longer prompts are cut to the model's context anyway
MAX_NEW_TOKENS = 2048
MAX_TEMPERATURE = 5.0
MAX_TOP_K = 1000
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 10.0  # far below 1, logits / penalty overflow
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
MAX_SEED = 2**53 - 1  # the largest integer every JSON client reads exactly (JavaScript's too)

StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class Strict(BaseModel):
    # JSON numbers only (no "5", no true), finite floats, no unknown fields.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")


def whole_number(v):
    # JSON Schema, and so the documented API, counts 16.0 as an integer; 16.5, "16" and true stay refused.
    return int(v) if isinstance(v, float) and v.is_integer() else v


def choose_seed(seed):
    """The request's seed, or a random one (returned to the client, so the text can be had again)."""
    return seed if seed is not None else secrets.randbelow(MAX_SEED + 1)


SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)} - {"seed", "stop"}


def sampling_params(body, **renamed):
    """A body's SamplingParams: its fields named as SamplingParams names them, then `renamed` ones
    (an API's own name for a field), a random seed when it gave none, and its stop strings."""
    named = body.model_dump(include=SAMPLING_FIELDS)
    return SamplingParams(**named, **renamed, seed=choose_seed(body.seed), stop=tuple(body.stop))


def check_prompt(prompt):
    if not prompt.strip():
        raise ValueError("prompt is empty or only whitespace")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("prompt is not valid Unicode (it holds a lone surrogate)") from None
    return prompt


# Shared by /generate and /v1/completions (vLLM accepts the same two beside OpenAI's fields).
MinP = Field(0.0, ge=0.0, le=1.0, description="keep tokens at least min_p times as likely as the likeliest; 0: off")
RepetitionPenalty = Field(
    1.0,
    ge=MIN_REPETITION_PENALTY,
    le=MAX_REPETITION_PENALTY,
    description="above 1, tokens already in the prompt or the output become less likely",
)


class GenerateRequest(Strict):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.8, ge=0.0, le=MAX_TEMPERATURE, description="0 (or below 1e-5) is greedy")
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = MinP
    repetition_penalty: float = RepetitionPenalty
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random when absent; returned")
    stop: list[StopString] = Field([], max_length=MAX_STOP_STRINGS)
    stream: bool = True
    model: str | None = None

    _prompt = field_validator("prompt")(check_prompt)
    _whole = field_validator("max_new_tokens", "top_k", "seed", mode="before")(whole_number)

    def to_sampling_params(self):
        return sampling_params(self)


class StreamOptions(Strict):
    include_usage: bool = False


def document_stop_limit(schema):
    """The schema of `stop` says the list holds at most MAX_STOP_STRINGS (a validator enforces it, with a
    clearer message than a constraint inside the union would give)."""
    for option in schema["anyOf"]:
        if option.get("type") == "array":
            option["maxItems"] = MAX_STOP_STRINGS


class CompletionRequest(Strict):
    """The subset of OpenAI's /v1/completions that a sampling-only model can honour."""

    model: str | None = None
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_tokens: int = Field(16, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = MinP
    repetition_penalty: float = RepetitionPenalty
    stop: StopString | list[StopString] | None = Field(
        None, validate_default=True, json_schema_extra=document_stop_limit
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None

    _prompt = field_validator("prompt")(check_prompt)
    _whole = field_validator("max_tokens", "seed", mode="before")(whole_number)

    def to_sampling_params(self):
        return sampling_params(self, max_new_tokens=self.max_tokens)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        v = [v] if isinstance(v, str) else (v or [])
        if len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return v
