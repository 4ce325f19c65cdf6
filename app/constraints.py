"""A request's output format as llguidance's grammar (model/grammar.py constrains the sampling with it): OpenAI's
`response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}) on the
completions and chat routes and /generate, and /generate's `regex` and `grammar` (llguidance's Lark dialect).

The request's fields are checked as the body is read (a schema or grammar that does not compile is a 422 naming its
field); whether the model's vocabulary can write a match at all (a character model without "{" cannot write JSON) is
known only with the model: a 400 when the request is admitted (check, in a thread: llguidance's work would hold up
the event loop's other requests)."""

import asyncio

from llguidance import LLMatcher

from app.errors import APIError
from model.grammar import vocabulary  # one a tokenizer in a process: an engine in a thread of the app's shares it

FIELDS = ("response_format", "regex", "grammar")
# JSON without whitespace between its tokens: a small model left free to add whitespace may add it until max_tokens
JSON_OPTIONS = {"whitespace_flexible": False}


def grammar_of(field, value):
    """llguidance's grammar for one of FIELDS' values (a ResponseFormat, a regex, a Lark grammar); None for the
    response format "text". ValueError: it does not compile, with llguidance's words."""
    if field == "response_format":
        if (value.type == "json_schema") != (value.json_schema is not None):
            raise ValueError("json_schema is given with type json_schema, and only then")
        if value.type == "text":
            return None
        schema = {"type": "object"} if value.type == "json_object" else value.json_schema.schema_
        try:
            grammar = LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        except ValueError as e:
            raise ValueError(f"the JSON schema: {e}") from None
    else:
        grammar = LLMatcher.grammar_from_regex(value) if field == "regex" else LLMatcher.grammar_from_lark(value)
    if error := LLMatcher.validate_grammar(grammar):
        what = "the JSON schema" if field == "response_format" else "it does not compile"
        raise ValueError(f"{what}: {error.strip()}")
    return grammar


def compiles(field):
    """A pydantic validator of `field`: no other output format is given before it, and its value compiles."""

    def validate(value, info):
        if given(value):
            if other := next((f for f in FIELDS if f != field and given(info.data.get(f))), None):
                raise ValueError(f"give one output format: {other} or {field}, not both")
            grammar_of(field, value)
        return value

    return validate


def given(value):
    """Whether a field's value asks for a format (a response_format of type text does not)."""
    return value is not None and getattr(value, "type", None) != "text"


def constraint(body):
    """(grammar, field) of a body's output format (at most one: compiles), or (None, None); made once a body."""
    if body._constraint is None:
        field = next((f for f in FIELDS if given(getattr(body, f, None))), None)
        body._constraint = (grammar_of(field, getattr(body, field)), field) if field else (None, None)
    return body._constraint


async def check(served, body):
    """Refuse (400) a body whose output format no text of the model's vocabulary can begin."""
    if any(given(getattr(body, f, None)) for f in FIELDS):  # a body without a format needs no thread
        await asyncio.to_thread(refuse_unsupported, served, body)


def refuse_unsupported(served, body):
    """check's blocking part: the grammar compiled (once a body) and tried on the model's vocabulary."""
    grammar, field = constraint(body)
    if grammar is not None and (why := vocabulary(served.tokenizer).check(grammar)):
        raise APIError(400, f"{field}: {why} (model {served.name!r})", param=field, code="unsupported_format")
