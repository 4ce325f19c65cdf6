"""Request bodies and their bounds: the one place that knows each limit."""

import dataclasses
import secrets
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, field_validator

from app.constraints import compiles, constraint
from model.sampling import SamplingParams

MAX_PROMPT_CHARS = 16_000  # longer prompts are cut to the model's context anyway
MAX_NEW_TOKENS = 2048
MAX_TEMPERATURE = 5.0
MAX_TOP_K = 1000
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 10.0  # far below 1, logits / penalty overflow
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
MAX_SEED = 2**53 - 1  # the largest integer every JSON client reads exactly (JavaScript's too)
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's chat API allows (its legacy completions allowed 5)
MAX_CHOICES = 8  # n: completions of one prompt, each a request in the engine

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


# the fields a body names as SamplingParams does; the rest each API maps itself (the logprobs differ in meaning)
SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)} - {"seed", "stop", "logprobs", "prompt_logprobs"}
SAMPLING_FIELDS -= {"grammar"}  # /generate's grammar is Lark text, SamplingParams' is llguidance's (constraints.py)


def sampling_params(body, seed=None, **renamed):
    """A body's SamplingParams: its fields named as SamplingParams names them, then `renamed` ones
    (an API's own name for a field), its seed (or `seed`, or a random one), and its stop strings."""
    named = body.model_dump(include=SAMPLING_FIELDS)
    seed = seed if seed is not None else choose_seed(body.seed)
    grammar = constraint(body)[0]
    return SamplingParams(**named, **renamed, seed=seed, stop=tuple(body.stop), grammar=grammar)


def choice_seeds(body):
    """One seed per choice of an n-choice request: the request's (or a random) seed, then the next ones, so
    that choice 0 is the text the same request with n = 1 gives."""
    first = choose_seed(body.seed)
    return [(first + i) % (MAX_SEED + 1) for i in range(body.n)]


def check_unicode(text, what="prompt"):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode (it holds a lone surrogate)") from None
    return text


def check_prompt(prompt):
    if not prompt.strip():
        raise ValueError("prompt is empty or only whitespace")
    return check_unicode(prompt)


# Shared by /generate and /v1/completions (vLLM accepts the same two beside OpenAI's fields).
MinP = Field(0.0, ge=0.0, le=1.0, description="keep tokens at least min_p times as likely as the likeliest; 0: off")
RepetitionPenalty = Field(
    1.0,
    ge=MIN_REPETITION_PENALTY,
    le=MAX_REPETITION_PENALTY,
    description="above 1, tokens already in the prompt or the output become less likely",
)


Logprobs = Field(
    None,
    ge=0,
    le=MAX_LOGPROBS,
    description="report each token's log-probability and this many likeliest alternatives, from the model's "
    "own distribution (before temperature, penalties and truncation); null: none",
)
N = Field(1, ge=1, le=MAX_CHOICES, description="completions of the prompt, seeded seed, seed + 1, ...")
# OpenAI's: subtracted from a generated token's logit, once (presence) or per time it was generated (frequency)
PresencePenalty = Field(0.0, ge=-2.0, le=2.0, description="lowers the logit of each token already generated")
FrequencyPenalty = Field(0.0, ge=-2.0, le=2.0, description="lowers a token's logit per time it was generated")


class JSONSchemaFormat(Strict):
    name: str = Field("response", max_length=64, description="the format's name (OpenAI's; not used)")
    description: str | None = None
    schema_: dict = Field(alias="schema", description="the JSON Schema that the output validates against")
    strict: bool | None = Field(None, description="accepted: the output always follows the schema")


class ResponseFormat(Strict):
    """OpenAI's response_format: text (no constraint), any JSON object, or JSON that validates against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = Field(None, description="with type json_schema, and only then")


class Constrained(Strict):
    """A body whose output may be constrained to a format (app/constraints.py): one of its response_format, and
    /generate's regex and grammar."""

    response_format: ResponseFormat | None = Field(None, description="the output's format: JSON, or JSON of a schema")

    _format = field_validator("response_format")(compiles("response_format"))
    _constraint: tuple | None = PrivateAttr(None)  # (grammar, field), once made (constraints.constraint)


class GenerateRequest(Constrained):
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
    logprobs: int | None = Logprobs
    regex: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="the output matches this regex")
    grammar: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="the output matches this Lark grammar")

    _prompt = field_validator("prompt")(check_prompt)
    _regex = field_validator("regex")(compiles("regex"))
    _grammar = field_validator("grammar")(compiles("grammar"))
    _whole = field_validator("max_new_tokens", "top_k", "seed", "logprobs", mode="before")(whole_number)

    def to_sampling_params(self):
        return sampling_params(self, logprobs=self.logprobs)


class StreamOptions(Strict):
    include_usage: bool = False


def document_stop_limit(schema):
    """The schema of `stop` says the list holds at most MAX_STOP_STRINGS (a validator enforces it, with a
    clearer message than a constraint inside the union would give)."""
    for option in schema["anyOf"]:
        if option.get("type") == "array":
            option["maxItems"] = MAX_STOP_STRINGS


def stop_list(v):
    v = [v] if isinstance(v, str) else (v or [])
    if len(v) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
    return v


Stop = Field(None, validate_default=True, json_schema_extra=document_stop_limit)


class OpenAIRequest(Constrained):
    """The fields OpenAI's completions and chat completions share, as Quill honours them."""

    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = MinP
    repetition_penalty: float = RepetitionPenalty
    presence_penalty: float = PresencePenalty
    frequency_penalty: float = FrequencyPenalty
    stop: StopString | list[StopString] | None = Stop
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = N
    user: str | None = None

    _whole_shared = field_validator("seed", "n", mode="before")(whole_number)
    _stop = field_validator("stop")(stop_list)


PromptText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)]
# A list's length is bounded by the body's size (QUILL_MAX_BODY_BYTES: 413) and the server's capacity (prompts x n
# at most QUILL_MAX_RUNNING + QUILL_MAX_QUEUED: 400), not by the schema.
PromptTexts = Annotated[list[PromptText], Field(min_length=1)]
PromptIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
PromptIdLists = Annotated[list[PromptIds], Field(min_length=1)]
PROMPT_SHAPES = (
    f"a string of 1..{MAX_PROMPT_CHARS} characters, a list of such strings, a list of token ids (integers "
    "from 0), or a list of such lists"
)


def prompt_shape(v, handler):
    """Token ids as whole numbers (16.0 too, as JSON Schema counts it), and one message for a prompt of none of
    the four shapes (a union's errors name each shape it is not)."""
    if v == []:
        raise ValueError("prompt is an empty list: give at least one prompt")
    if isinstance(v, list):
        v = [[whole_number(i) for i in p] if isinstance(p, list) else whole_number(p) for p in v]
    try:
        return handler(v)
    except ValueError:
        raise ValueError(f"prompt must be {PROMPT_SHAPES}") from None


def prompt_ids(tokenizer, prompt):
    """A prompt's token ids: a text's (ValueError: characters the vocabulary lacks), or the ids given, each one
    in the vocabulary (ValueError: the ones that are not)."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if bad := [i for i in prompt if i >= tokenizer.vocab_size]:
        raise ValueError(f"token ids {bad[:5]} not in the vocabulary (0..{tokenizer.vocab_size - 1})")
    return list(prompt)


class CompletionRequest(OpenAIRequest):
    """The subset of OpenAI's legacy /v1/completions that a sampling-only model can honour, with logprobs
    and echo as evaluation harnesses use them: echo with max_tokens 0 and logprobs scores a text. `prompt`
    may be a list of prompts (each prompt's choices follow the one before's) and a prompt may be token ids."""

    model: str | None = None
    prompt: PromptText | PromptTexts | PromptIds | PromptIdLists = Field(
        description=f"the text to continue, or several; {PROMPT_SHAPES}"
    )
    echo: bool = Field(False, description="the prompt comes back before the completion (with logprobs: scored)")
    max_tokens: int = Field(16, ge=0, le=MAX_NEW_TOKENS, description="0 only with echo: the prompt alone")
    logprobs: int | None = Logprobs

    _shape = field_validator("prompt", mode="wrap")(prompt_shape)
    _whole = field_validator("max_tokens", "logprobs", mode="before")(whole_number)

    @field_validator("prompt")
    @classmethod
    def _texts(cls, v):
        for prompt in [v] if isinstance(v, str) else v:
            if isinstance(prompt, str):
                check_prompt(prompt)
        return v

    def prompts(self):
        """The prompts, each a text or a list of token ids."""
        one = isinstance(self.prompt, str) or isinstance(self.prompt[0], int)
        return [self.prompt] if one else list(self.prompt)

    @field_validator("max_tokens")
    @classmethod
    def _nothing_to_return(cls, v, info):  # echo is validated first: it comes first
        if v == 0 and not info.data.get("echo"):
            raise ValueError("max_tokens is 0 without echo: there would be nothing to return")
        return v

    def to_sampling_params(self, seed=None):
        prompt_logprobs = self.logprobs if self.echo else None
        return sampling_params(
            self, seed, max_new_tokens=self.max_tokens, logprobs=self.logprobs, prompt_logprobs=prompt_logprobs
        )


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    # "developer" is OpenAI's newer name for "system"; tool messages have no meaning to a model without tools
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self):
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)

    @field_validator("content")
    @classmethod
    def _unicode(cls, v):
        for text in [v] if isinstance(v, str) else [part.text for part in v]:
            check_unicode(text, "content")
        return v


CHAT_MAX_TOKENS = 256  # when a chat request sets neither max_tokens nor max_completion_tokens


class ChatRequest(OpenAIRequest):
    """OpenAI's /v1/chat/completions, as far as a text model without tools or images can honour it."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS, description="OpenAI's older name")
    logprobs: bool = Field(False, description="each reply token's log-probability (top_logprobs: alternatives)")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    _whole = field_validator("max_completion_tokens", "max_tokens", "top_logprobs", mode="before")(whole_number)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v, info):
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    def to_sampling_params(self, seed=None, stop=()):
        """`stop`: the chat format's end-of-turn strings, after the request's own."""
        params = sampling_params(
            self,
            seed,
            max_new_tokens=self.max_completion_tokens or self.max_tokens or CHAT_MAX_TOKENS,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
        )
        return dataclasses.replace(params, stop=params.stop + tuple(s for s in stop if s not in params.stop))


# POST /tokenize and /detokenize: llama.cpp's server's fields (content, add_special, with_pieces, tokens) and vLLM's
# (prompt, add_special_tokens), so that either's clients count tokens here as there
class TokenizeRequest(Strict):
    model: str | None = None
    content: str | None = Field(None, description="the text (llama.cpp's name)")
    prompt: str | None = Field(None, description="the text (vLLM's name); give one of content and prompt")
    add_special: bool = Field(False, description="accepted: Quill adds no special tokens to a prompt")
    add_special_tokens: bool = Field(False, description="vLLM's name for add_special")
    with_pieces: bool = Field(False, description="each token as {id, piece}: its text, or its bytes if not UTF-8")

    def text(self):
        if (self.content is None) == (self.prompt is None):
            raise ValueError("give the text as one of content and prompt")
        return check_unicode(self.content if self.content is not None else self.prompt, "the text")


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int] = Field(description="token ids of the model's vocabulary")
