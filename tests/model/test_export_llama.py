"""The GGUF export run by llama.cpp itself: llama-server's tokens and greedy text equal Quill's. These run
when QUILL_LLAMA_CPP_BIN names a folder holding llama-server (`make bench-peers` builds one in
.tools/llama.cpp/build/bin); the file's contents are tested without it in test_export.py."""

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch
from helpers import BPE_TEXT, REPO, tiny_gpt

from model import BPETokenizer, load_checkpoint
from model.export import export_gguf

BUNDLED_GPT = REPO / "checkpoints" / "shakespeare-gpt"


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([BPE_TEXT * 20], vocab_size=300)


def greedy_margins(model, ids, n):
    """Quill's greedy continuation, and by how much each chosen token's logit beat the runner-up's."""
    x, margins = torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(n):
            top = model(x)[0][0, -1].topk(2)
            margins.append((top.values[0] - top.values[1]).item())
            x = torch.cat([x, top.indices[None, :1]], dim=1)
    return x[0, len(ids) :].tolist(), margins


def wait_until_ready(server, url, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"llama-server exited with {server.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health").status_code == 200:
                return
        time.sleep(0.2)
    pytest.fail(f"llama-server was not ready in {timeout} s")


@contextlib.contextmanager
def llama_server(gguf_path, context_size):
    """llama-server on `gguf_path`, on a free port; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [f"{LLAMA_BIN}/llama-server", "-m", gguf_path, "-c", str(context_size), "-t", "2", "-np", "1"]
        + ["--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_ready(server, f"http://127.0.0.1:{port}")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def llama_greedy(url, prompt, n, **extra):
    body = {"prompt": prompt, "n_predict": n, "temperature": 0, "top_k": 1, "cache_prompt": False, **extra}
    return httpx.post(f"{url}/completion", json=body, timeout=60).json()


LLAMA_BIN = os.environ.get("QUILL_LLAMA_CPP_BIN")
needs_llama_server = pytest.mark.skipif(
    not (LLAMA_BIN and (Path(LLAMA_BIN) / "llama-server").is_file()),
    reason="set QUILL_LLAMA_CPP_BIN to a directory holding llama.cpp's llama-server",
)


@pytest.mark.slow
@needs_llama_server
def test_llama_server_greedy_continuation_matches_quill_for_30_tokens(tmp_path):
    """llama-server on the exported bundled GPT continues a prompt, greedily, with Quill's 30 tokens.

    Where they can diverge: the course model's MLP uses exact GELU, llama.cpp's gpt2 the tanh form (on a
    CPU through an f16 table), so logits differ by about 1e-3; a step whose two likeliest tokens are that
    close could pick differently, and every later token would follow. This prompt has no such near tie.
    The prompt's '!' and newline also check that no character ends the generation or is rewritten."""
    model, tokenizer, _ = load_checkpoint(BUNDLED_GPT)
    out = tmp_path / "shakespeare.gguf"
    export_gguf(model, tokenizer, out, "f32")
    prompt = "ROMEO:\nWhat, ho! "
    with llama_server(out, model.context_size) as url:
        reply = llama_greedy(url, prompt, 30)
    assert reply["content"] == tokenizer.decode(greedy_margins(model, tokenizer.encode(prompt), 30)[0])


def trained_bpe_gpt(bpe, steps=300):
    """A tiny GPT trained for a few seconds on BPE_TEXT, which it learns by heart: no greedy step is near a tie."""
    data = torch.tensor(bpe.encode(BPE_TEXT * 20))
    model = tiny_gpt(vocab_size=bpe.vocab_size, context_size=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = torch.Generator().manual_seed(0)
    for _ in range(steps):
        windows = torch.stack([data[i : i + 65] for i in torch.randint(len(data) - 65, (16,), generator=rng)])
        _, loss = model(windows[:, :-1], windows[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


LLAMA_GPT2_DEFAULT_EOS = 11  # the bos and eos id llama.cpp's gpt2 vocab assumes (src/llama-vocab.cpp)
NEAR_TIE = 0.02  # ten times the ~2e-3 by which llama.cpp's margins differ from Quill's (GELU, above)


@pytest.mark.slow
@needs_llama_server
def test_llama_server_tokenizes_and_continues_a_bpe_model_as_quill_does(tmp_path, bpe):
    """The exported BPE tokenizes text as Quill's does, llama-server's greedy continuation is Quill's (the model
    has no near tie, where the two GELUs could part, see above), and nothing ends generation early: not the
    token llama.cpp would take for eos by default, nor the end token, which llama.cpp never chooses."""
    model = trained_bpe_gpt(bpe)
    out = tmp_path / "bpe.gguf"
    export_gguf(model, bpe, out, "f32")
    text = BPE_TEXT + "I'll say 'tis 42, or 1984:  two  spaces,\ttabs\r\n and 🎭 ‽ 中文 ÿ\n\n\n"
    prompt = "die.\n\nNURSE:\nHer"  # continued with commas, and characters split across tokens (é is two)
    end_token = bpe.vocab_size
    with llama_server(out, model.context_size) as url:
        tokens = httpx.post(f"{url}/tokenize", json={"content": text}, timeout=60).json()["tokens"]
        reply = llama_greedy(url, prompt, 30, return_tokens=True)
        pushed = llama_greedy(
            url, prompt, 5, return_tokens=True, logit_bias=[[LLAMA_GPT2_DEFAULT_EOS, 100], [end_token, 200]]
        )
    assert tokens == bpe.encode(text)
    want, margins = greedy_margins(model, bpe.encode(prompt), 30)
    assert min(margins) > NEAR_TIE, "the test model has a near tie, where llama.cpp may part from Quill"
    assert reply["tokens"] == want
    assert reply["content"] == bpe.decode(reply["tokens"]) and reply["tokens_predicted"] == 30
    assert pushed["tokens"] == [LLAMA_GPT2_DEFAULT_EOS] * 5 and pushed["stop_type"] == "limit"
