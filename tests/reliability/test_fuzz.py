"""Schemathesis fuzzes the API from its OpenAPI schema: valid and invalid requests alike get no 5xx and
a response the schema documents (status, content type, body shape)."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.main import create_app
from app.settings import Settings

# The schema does not depend on the checkpoints, so it is read at import from an app that loads none.
schema = schemathesis.openapi.from_dict(create_app(Settings(_env_file=None)).openapi())
schema.config.generation.update(modes=list(GenerationMode), max_examples=50, database="none")
# A body over QUILL_MAX_BODY_BYTES is refused for its size (413) before its fields are read: a list of prompts with
# one item out of bounds, beside others in bounds, can be that large.
rejection = schema.config.checks.negative_data_rejection
rejection.expected_statuses = [*rejection.expected_statuses, "413"]

# A JSON Schema cannot say which characters a model knows, that a prompt needs more than whitespace, nor
# rules between two fields (max_tokens 0 only with echo, top_logprobs only with logprobs): a request valid by
# the schema may be refused with 422 for these reasons, and for no other.
REFUSALS_BY_MEANING = (
    "not in the vocabulary",
    "empty or only whitespace",
    "lone surrogate",
    "max_tokens is 0 without echo",
    "top_logprobs needs logprobs: true",
    "one of content and prompt",  # /tokenize: either's name for the text, which the schema cannot say
    # an output format (app/constraints.py): one a request, json_schema with its type, and a regex, grammar or
    # schema that llguidance compiles
    "give one output format",
    "json_schema is given with type json_schema",
    "it does not compile",
    "the JSON schema",
)
LONG_RUN_REQUESTS = 5000


@pytest.fixture
def app(checkpoints):
    """A fresh app per test: schemathesis ends the app's lifespan after each one."""
    paths = [checkpoints[name] for name in ("tiny-gpt", "byte-gpt", "tiny-lstm")]
    return create_app(Settings(_env_file=None, checkpoints=[str(p) for p in paths]))


def call_and_check(case, app):
    response = case.call(app=app)
    case.validate_response(response, excluded_checks=[positive_data_acceptance])
    if case.meta.generation.mode.is_positive and response.status_code == 422:
        message = response.json()["error"]["message"]
        assert any(why in message for why in REFUSALS_BY_MEANING), f"valid request refused: {message}"
    return response


@schema.parametrize()
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # one app serves all examples, by design
def test_fuzzed_request_gets_no_5xx_and_a_documented_response(case, app):
    call_and_check(case, app)


@pytest.mark.long
def test_fuzzing_5000_requests_across_all_operations_finds_no_5xx_and_no_undocumented_response(app):
    sent = []
    cases = st.one_of(*(schema.as_strategy(generation_mode=mode) for mode in GenerationMode))

    @given(case=cases)
    @settings(max_examples=LONG_RUN_REQUESTS, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def fuzz(case):
        sent.append(call_and_check(case, app).status_code)

    fuzz()
    assert len(sent) >= LONG_RUN_REQUESTS
    print(f"\n{len(sent)} requests; statuses: {sorted((s, sent.count(s)) for s in set(sent))}")
