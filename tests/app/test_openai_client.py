"""The official `openai` client, pointed at a running server, reads it as it reads OpenAI."""

import openai
import pytest

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_lists_the_models(client):
    assert [m.id for m in client.models.list()] == ["tiny-gpt", "tiny-lstm"]


def test_openai_client_completes_without_streaming(client):
    completion = client.completions.create(model="tiny-lstm", prompt="Hello", max_tokens=8, temperature=0, seed=1)
    assert completion.model == "tiny-lstm"
    assert completion.choices[0].finish_reason == "length"
    assert isinstance(completion.choices[0].text, str) and completion.choices[0].text
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 8)


def test_openai_client_streams_the_same_text_and_then_the_usage(client):
    expected = client.completions.create(model="tiny-gpt", prompt="Hello", max_tokens=12, seed=4).choices[0].text
    chunks = list(
        client.completions.create(
            model="tiny-gpt", prompt="Hello", max_tokens=12, seed=4, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_openai_client_stops_at_a_stop_string(client):
    text = client.completions.create(model="tiny-gpt", prompt="Hello", max_tokens=30, temperature=0).choices[0].text
    stop = text[8:10]
    choice = client.completions.create(
        model="tiny-gpt", prompt="Hello", max_tokens=30, temperature=0, stop=[stop]
    ).choices[0]
    assert (choice.finish_reason, choice.text) == ("stop", text[: text.index(stop)])


def test_openai_client_raises_its_own_errors_for_ours(client):
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.completions.create(model="nope", prompt="Hello")
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.completions.create(model="tiny-gpt", prompt="Hello", temperature=-1)


def test_openai_client_chats_streaming_and_not_alike(client):
    ask = {"model": "tiny-gpt", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 12, "seed": 3}
    whole = client.chat.completions.create(**ask)
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.prompt_tokens == len("User: Hello\nAssistant:")


def test_openai_client_reads_echo_logprobs_n_and_chat_logprobs(client):
    scored = client.completions.create(model="tiny-gpt", prompt="Hello", max_tokens=0, echo=True, logprobs=2)
    lp = scored.choices[0].logprobs
    assert lp.tokens == list("Hello") and lp.token_logprobs[0] is None and len(lp.top_logprobs[1]) == 2
    many = client.completions.create(model="tiny-gpt", prompt="Hello", max_tokens=5, n=3, seed=1)
    assert [c.index for c in many.choices] == [0, 1, 2] and many.usage.completion_tokens == 15
    ask = {"model": "tiny-lstm", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    chat = client.chat.completions.create(**ask, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
