"""Every `curl` command in README.md, run as printed by the real curl binary against a real server
serving the bundled models (what `make serve` serves): a README example that breaks fails here."""

import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from service_helpers import REPO, parse_sse, running_server

pytestmark = [pytest.mark.server, pytest.mark.slow]

CURL = shutil.which("curl")
README_ADDRESSES = ("localhost:8000", "127.0.0.1:8000")  # where the README's server listens
LLAMA_SERVER = "localhost:8080"  # the GGUF section's llama-server, not Quill: left to llama.cpp


def readme_curl_commands():
    """Each curl command of README.md's fenced code blocks, as its argument list (continuations joined)."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if not re.search(r"\bcurl\b", line):
                continue
            words = shlex.split(line, comments=True)
            if "curl" in words and not any(LLAMA_SERVER in w for w in words):
                assert words[0] == "curl", f"a curl command this test cannot run alone: {line}"
                commands.append(words)
    return commands


COMMANDS = readme_curl_commands()


def test_readme_has_curl_commands_to_check():
    assert COMMANDS, "no curl command found in README.md's code blocks"
    assert any("generate" in " ".join(c) for c in COMMANDS)


def values(words, *names):
    """The value after each of these options, in order."""
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w in names]


@pytest.fixture(scope="module")
def bundled_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("readme") / "server.log"
    with running_server(["-m", "app"], {}, log) as server:
        yield server


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
@pytest.mark.parametrize("words", COMMANDS, ids=[shlex.join(c[1:])[:70] for c in COMMANDS])
def test_readme_curl_command_works_as_printed(bundled_server, words, tmp_path):
    address = bundled_server.url.removeprefix("http://")
    args = [next((w.replace(a, address) for a in README_ADDRESSES if a in w), w) for w in words[1:]]
    url = next((a for a in args if address in a), None)
    assert url, f"no README address ({', '.join(README_ADDRESSES)}) in {shlex.join(words)}"
    out = tmp_path / "reply"
    # -o and -w only say where the reply goes and what to print about it: the request is the README's
    done = subprocess.run(
        [CURL, *args, "-sS", "--max-time", "120", "-o", str(out), "-w", "%{http_code} %{content_type}"],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stderr
    status, _, content_type = done.stdout.partition(" ")
    reply = out.read_text()
    assert status == "200", f"{shlex.join(words)}\n-> HTTP {status}: {reply}"

    data = values(words, "-d", "--data", "--data-raw", "--data-binary")
    body = json.loads(data[-1]) if data else {}
    if "Accept: text/plain" in values(words, "-H", "--header"):
        assert content_type.startswith("text/plain")
        assert reply.strip() and not reply.startswith(("{", "event:"))
        assert reply.endswith("\n"), "the text ends without a newline: the shell's prompt would follow it"
    elif data and body.get(
        "stream", url.endswith("/generate")
    ):  # /generate streams unless told not to; /v1 the reverse
        assert content_type.startswith("text/event-stream")
        events = parse_sse(reply)
        names = [name for name, _ in events]
        assert names[-1] == "done" and set(names[:-1]) == {"token"}, names
        done_event = events[-1][1]
        assert done_event["usage"]["completion_tokens"] == len(names) - 1
        assert done_event["text"] == "".join(data["text"] for _, data in events[:-1])
    else:
        assert content_type.startswith("application/json")
        result = json.loads(reply)
        assert isinstance(result, dict)
        choice = result["choices"][0] if "choices" in result else {}
        if data and body.get("max_tokens") == 0:  # a text scored: echoed, one log-probability per character
            assert choice["text"] == body["prompt"] and result["usage"]["completion_tokens"] == 0
            assert len(choice["logprobs"]["token_logprobs"]) == len(body["prompt"])
        elif url.endswith("/tokenize"):  # a text's ids in the default model's vocabulary
            assert result["count"] == len(result["tokens"]) > 0 and result["model"] == "shakespeare-gpt"
        elif url.endswith("/detokenize"):  # one character a token in the bundled GPT's vocabulary
            assert len(result["content"]) == len(body["tokens"]) and result["prompt"] == result["content"]
        elif data and "messages" in body:  # a chat's reply (it may end at once, at the next turn)
            assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
            assert result["usage"]["completion_tokens"] > 0
        elif data:  # a generation
            text = choice["text"] if choice else result["text"]
            assert text and result["usage"]["completion_tokens"] > 0


def test_readme_python_client_example_runs_as_printed(bundled_server, tmp_path):
    """The README's `openai` example, run as a script with only its address changed: it prints text, and ends
    its line (or the shell's prompt would follow the text)."""
    blocks = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)
    example = next(b for b in blocks if "from openai import OpenAI" in b)
    script = tmp_path / "example.py"
    script.write_text(example.replace("http://127.0.0.1:8000", bundled_server.url))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the example printed nothing"
    assert done.stdout.endswith("\n"), done.stdout[-200:]
