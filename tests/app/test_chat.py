"""POST /v1/chat/completions: messages become a prompt through the checkpoint's chat template (compared with
transformers' own rendering) or Quill's plain transcript; a reply ends at the next turn's marker."""

from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from helpers import END, save_gpt2
from service_helpers import parse_sse

from app.chat import TURN_MARKERS, chat_prompt, transcript
from app.errors import APIError
from app.main import create_app
from app.protocol import MAX_PROMPT_CHARS, ChatMessage
from app.settings import Settings
from model import load_checkpoint
from model.import_hf import main as import_main

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": [{"type": "text", "text": "How "}, {"type": "text", "text": "are you?"}]},
]
PROMPT = "System: Be brief.\nUser: Hello there\nAssistant: Hi.\nUser: How are you?\nAssistant:"


def serve(*paths):
    return TestClient(create_app(Settings(_env_file=None, checkpoints=[str(p) for p in paths])))


@pytest.fixture(scope="module")
def client(checkpoints):
    with serve(checkpoints["tiny-gpt"]) as c:
        yield c


def chat(client, **body):
    r = client.post("/v1/chat/completions", json={"messages": MESSAGES, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_plain_transcript_is_the_documented_format():
    assert transcript([ChatMessage(**m) for m in MESSAGES]) == PROMPT


def test_a_chat_is_the_completion_of_its_transcript_stopping_at_the_next_turn(client):
    assert client.get("/v1/models/tiny-gpt").json()["chat_format"] == "transcript"
    body = chat(client, max_tokens=20, seed=5, temperature=0.9)
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert choice["message"]["role"] == "assistant" and choice["logprobs"] is None
    completion = client.post(
        "/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 20, "seed": 5, "temperature": 0.9, "stop": list(TURN_MARKERS)},
    ).json()
    assert choice["message"]["content"] == completion["choices"][0]["text"].lstrip()
    assert choice["finish_reason"] == completion["choices"][0]["finish_reason"]
    assert body["usage"] == completion["usage"] and body["usage"]["prompt_tokens"] == len(PROMPT)


@pytest.fixture
def scripted(client, monkeypatch):
    """The sampler replaced by one that writes `reply` token by token, whatever the model says."""
    from model import sampling

    tokenizer = client.app.state.service.get(None).tokenizer

    def script(reply):
        ids = iter(tokenizer.encode(reply))
        monkeypatch.setattr(sampling, "sample", lambda samplers, logits: [next(ids) for _ in samplers])

    return script


def test_the_reply_ends_where_the_model_starts_the_users_next_turn(client, scripted):
    scripted(" Fine, thanks.\nUser: and you")
    choice = chat(client, max_tokens=27)["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("Fine, thanks.", "stop")
    scripted(" Fine, thanks.\nUser: and you")
    r = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 27, "stream": True})
    chunks = [data for _, data in parse_sse(r.text)]
    assert chunks[-1] == "[DONE]"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "Fine, thanks."
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "stop"


def test_chat_logprobs_give_each_tokens_bytes_and_alternatives(client):
    choice = chat(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 6
    for entry in content:
        assert bytes(entry["bytes"]).decode() == entry["token"]
        assert [a["token"] for a in entry["top_logprobs"]][0] == entry["token"]  # greedy: the likeliest
        assert entry["logprob"] == entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
    assert "".join(e["token"] for e in content).lstrip() == choice["message"]["content"]


def test_n_chat_choices_each_have_their_own_seed(client):
    body = chat(client, max_tokens=8, seed=2, n=2)
    singles = [chat(client, max_tokens=8, seed=s)["choices"][0]["message"]["content"] for s in (2, 3)]
    assert [c["message"]["content"] for c in body["choices"]] == singles


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", "system"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs", "logprobs: true"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": []}, "tools", "Extra inputs"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None, "text"),
    ],
)
def test_what_a_chat_cannot_take_is_refused_naming_it(client, body, param, message):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert message in error["message"]
    if param:
        assert error["param"] == param


def test_a_chat_too_long_for_a_prompt_is_a_400_naming_the_messages(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a" * MAX_PROMPT_CHARS}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert str(MAX_PROMPT_CHARS) in r.json()["error"]["message"]


TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('the system message must come first') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    """A GPT-2 with a chat template in its tokenizer files, imported: (transformers' tokenizer, run dir)."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("chat")
    _, tokenizer = save_gpt2(root / "hf")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=END, eos_token=END)
    fast.chat_template = TEMPLATE
    fast.save_pretrained(root / "hf")
    import_main([str(root / "hf"), "--out", str(root / "gpt2-chat")])
    return fast, root / "gpt2-chat"


def test_a_checkpoints_chat_template_renders_as_transformers_renders_it(templated):
    fast, run = templated
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    rendered = fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|assistant|>") and END in rendered
    _, ours, meta = load_checkpoint(run)
    assert meta["special_tokens"] == {"bos_token": END, "eos_token": END}
    with serve(run) as client:
        common = {"max_tokens": 12, "temperature": 0}
        r = client.post("/v1/chat/completions", json={"messages": messages, **common})
        assert r.status_code == 200, r.text
        completion = client.post("/v1/completions", json={"prompt": rendered, "stop": [END], **common}).json()
        assert r.json()["usage"]["prompt_tokens"] == len(ours.encode(rendered))
        assert r.json()["choices"][0]["message"]["content"] == completion["choices"][0]["text"].lstrip()
        refused = client.post("/v1/chat/completions", json={"messages": [*messages, messages[0]]})
        assert client.get(f"/v1/models/{run.name}").json()["chat_format"] == "template"
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == "messages"
    assert "the system message must come first" in refused.json()["error"]["message"]


def test_the_end_token_of_a_template_ends_the_reply(templated, monkeypatch):
    from model import sampling

    _, run = templated
    _, tokenizer, _ = load_checkpoint(run)
    ids = iter(tokenizer.encode("Hi") + [tokenizer.tokenizer.token_to_id(END)] + tokenizer.encode(" more"))
    with serve(run) as client:  # started (its warm-up samples too), then scripted
        monkeypatch.setattr(sampling, "sample", lambda samplers, logits: [next(ids) for _ in samplers])
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5}
        choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("Hi", "stop")


def test_a_lone_surrogate_in_a_message_is_a_422_on_every_tokenizer(checkpoints):
    with serve(checkpoints["tiny-gpt"], checkpoints["bpe-gpt"]) as client:
        for model in ("tiny-gpt", "bpe-gpt"):
            body = '{"model": "MODEL", "messages": [{"role": "user", "content": "hi \\ud800"}]}'.replace("MODEL", model)
            r = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 422, r.text
            assert "lone surrogate" in r.json()["error"]["message"]


def render(template, messages=MESSAGES[:2]):
    served = SimpleNamespace(meta={"chat_template": template, "special_tokens": {"eos_token": END}})
    return chat_prompt(served, [ChatMessage(**m) for m in messages])


def test_templates_render_with_transformers_extras_and_their_failures_are_named():
    assert render("{% for m in messages %}{{ m['role'] }}{% break %}{% endfor %}")[0] == "system"
    assert render("{{ messages[1]['content'] | tojson }}")[0] == '"Hello there"'
    assert render("{{ '<b> & é' | tojson }}")[0] == '"<b> & é"'  # not HTML-escaped, as transformers writes it
    assert render("{{ strftime_now('%Y') }}")[0].isdigit()
    for template, status, words in [
        ("{% if messages[0]['role'] == 'user' %}x{% endif %}", 400, "empty prompt"),
        ("{{ messages[0]['content'] / 2 }}", 400, "failed on them: TypeError"),
        ("{% for m in messages %}", 500, "does not parse"),
    ]:
        with pytest.raises(APIError) as refused:
            render(template)
        assert refused.value.status == status and words in refused.value.message
