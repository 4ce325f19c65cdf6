"""GGUF export: the file holds our weights, shape and vocabulary as llama.cpp's gpt2 reads them."""

import json
import math
import re
import shlex
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from helpers import BPE_TEXT, REPO, TINY_GPT, tiny_gpt, tiny_lstm, trainer_env

from model import BPETokenizer, ByteTokenizer, CharTokenizer, load_checkpoint, save_checkpoint
from model.export import END_TOKEN, export_gguf, main

# 40 characters, to match the tiny configs; newline, tab, backslash and non-ASCII ones test the escaping.
CHARS = "abcdefghijklmnopqrstuvwxyz .,;:!?'\n-\\\té€"
Q = gguf.GGMLQuantizationType
BUNDLED_GPT = REPO / "checkpoints" / "shakespeare-gpt"


def exported(tmp_path, model, tokenizer=None, dtype="f32"):
    path = tmp_path / f"model-{dtype}.gguf"
    export_gguf(model, tokenizer or CharTokenizer(CHARS), path, dtype, name="tiny")
    return gguf.GGUFReader(path)


def read_tensors(reader):
    """{name: (type, float32 array in torch's (out, in) order)}, dequantized by gguf's own code."""
    return {t.name: (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}


def expected_tensors(model):
    """Every tensor llama.cpp's gpt2 loader asks for, named by hand from its source (src/models/gpt2.cpp)."""
    out = {
        "token_embd.weight": model.tok_emb.weight,
        "position_embd.weight": model.pos_emb.weight,
        "output_norm.weight": model.ln_f.weight,
        "output_norm.bias": model.ln_f.bias,
        "output.weight": model.lm_head.weight,
    }
    for i, b in enumerate(model.blocks):
        parts = {
            "attn_norm": b.ln1,
            "attn_qkv": b.attn.qkv,
            "attn_output": b.attn.proj,
            "ffn_norm": b.ln2,
            "ffn_up": b.mlp.fc,
            "ffn_down": b.mlp.proj,
        }
        for name, module in parts.items():
            out[f"blk.{i}.{name}.weight"], out[f"blk.{i}.{name}.bias"] = module.weight, module.bias
    return {k: v.detach().numpy() for k, v in out.items()}


def field(reader, key):
    return reader.get_field(key).contents()


def llama_cpp_unescape(token):
    """llama.cpp's llama_unescape_rwkv_token (src/llama-vocab.cpp), ported: how it reads our vocabulary."""
    out, escaping, hex_left, acc = bytearray(), False, 0, 0
    for c in token.encode("utf-8"):
        if hex_left:
            acc = (acc << 4) + (c - ord("a") + 10 if c >= ord("a") else c - ord("0"))
            hex_left -= 1
            if not hex_left:
                out.append(acc & 0xFF)
                acc = 0
        elif escaping:
            escaping = False
            if c == ord("x"):
                hex_left = 2
            else:
                out += {ord("t"): b"\t", ord("n"): b"\n", ord("r"): b"\r"}.get(c, bytes([c]))
        elif c == ord("\\"):
            escaping = True
        else:
            out.append(c)
    return bytes(out)


def test_gguf_f32_holds_every_weight_exactly_under_llama_cpp_gpt2_names(tmp_path):
    model = tiny_gpt()
    got, want = read_tensors(exported(tmp_path, model)), expected_tensors(model)
    assert got.keys() == want.keys()
    for name, (qtype, data) in got.items():
        assert qtype == Q.F32, name
        assert np.array_equal(data, want[name]), name


def test_gguf_f16_rounds_matrices_to_f16_and_keeps_vectors_and_positions_f32(tmp_path):
    model = tiny_gpt()
    got, want = read_tensors(exported(tmp_path, model, dtype="f16")), expected_tensors(model)
    for name, (qtype, data) in got.items():
        exact = want[name].ndim == 1 or name == "position_embd.weight"
        assert qtype == (Q.F32 if exact else Q.F16), name
        assert np.array_equal(data, want[name] if exact else want[name].astype(np.float16).astype(np.float32)), name


def test_gguf_q8_0_dequantizes_to_the_weights_within_about_half_a_step_of_each_block(tmp_path):
    model = tiny_gpt()
    got, want = read_tensors(exported(tmp_path, model, dtype="q8_0")), expected_tensors(model)
    quantized = [name for name, (qtype, _) in got.items() if qtype == Q.Q8_0]
    assert len(quantized) == 2 + 4 * TINY_GPT["n_layer"]  # token_embd, output and four matrices a block
    for name in quantized:
        w = want[name].reshape(-1, 32)  # q8_0: blocks of 32 along a row, each scaled by max|w| / 127
        step = np.abs(w).max(axis=1, keepdims=True) / 127
        err = np.abs(got[name][1].reshape(-1, 32) - w)
        # half a step of rounding, plus the scale's own rounding to f16 (2^-11 of it) times up to 127 steps
        assert (err <= step * (0.5 + 127 / 2048) + 1e-12).all(), name
        assert not np.array_equal(got[name][1], want[name])  # it was really quantized


def test_gguf_q8_0_stores_rows_that_are_not_a_multiple_of_32_wide_as_f16(tmp_path):
    model = tiny_gpt(hidden_size=48)
    got = read_tensors(exported(tmp_path, model, dtype="q8_0"))
    assert got["blk.0.attn_qkv.weight"][0] == Q.F16  # rows of 48
    assert got["blk.0.ffn_down.weight"][0] == Q.Q8_0  # rows of 4 * 48 = 192


def test_gguf_metadata_describes_the_model_as_gpt2(tmp_path):
    model = tiny_gpt()
    reader = exported(tmp_path, model, dtype="f16")
    c = model.config
    assert field(reader, "general.architecture") == "gpt2"
    assert field(reader, "general.name") == "tiny"
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert field(reader, "gpt2.context_length") == c.context_size
    assert field(reader, "gpt2.embedding_length") == c.hidden_size
    assert field(reader, "gpt2.feed_forward_length") == model.blocks[0].mlp.fc.out_features
    assert field(reader, "gpt2.block_count") == c.n_layer
    assert field(reader, "gpt2.attention.head_count") == c.n_head
    assert math.isclose(field(reader, "gpt2.attention.layer_norm_epsilon"), model.ln_f.eps, rel_tol=1e-6)
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.ggml.add_space_prefix") is False


def test_gguf_vocabulary_reads_back_as_the_character_tokenizer(tmp_path):
    tokenizer = CharTokenizer(CHARS)
    reader = exported(tmp_path, tiny_gpt(), tokenizer)
    assert field(reader, "tokenizer.ggml.model") == "rwkv"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert [llama_cpp_unescape(t) for t in tokens] == [tokenizer.decode_bytes([i]) for i in range(len(CHARS))]
    assert len(set(tokens)) == len(tokens)  # llama.cpp refuses a duplicate
    assert field(reader, "tokenizer.ggml.token_type") == [gguf.TokenType.NORMAL] * len(CHARS)


def test_gguf_vocabulary_of_a_byte_model_is_its_256_bytes(tmp_path):
    reader = exported(tmp_path, tiny_gpt(vocab_size=256), ByteTokenizer())
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert [llama_cpp_unescape(t) for t in tokens] == [bytes([i]) for i in range(256)]


# A byte-level BPE: written as GPT-2's tokenizer, with one end token after the model's (see add_tokenizer).
@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([BPE_TEXT * 20], vocab_size=300)


def json_merges(tokenizer):
    return json.loads(tokenizer.to_dict()["json"])["model"]["merges"]


def test_export_command_writes_a_bpe_checkpoint_as_gpt2s_tokens_and_merges_with_one_unused_end_token(tmp_path, bpe):
    n = bpe.vocab_size
    save_checkpoint(tmp_path / "bpe.safetensors", tiny_gpt(vocab_size=n), bpe, {})
    reader = gguf.GGUFReader(export_cli(tmp_path, tmp_path / "bpe.safetensors"))
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.tokens") == [bpe.tokenizer.id_to_token(i) for i in range(n)] + [END_TOKEN]
    assert field(reader, "tokenizer.ggml.token_type") == [gguf.TokenType.NORMAL] * n + [gguf.TokenType.UNUSED]
    merges = field(reader, "tokenizer.ggml.merges")
    assert len(merges) == n - 256 and merges == [" ".join(m) for m in json_merges(bpe)]
    # llama.cpp's gpt2 vocab would take id 11 (',' here) as bos and eos, ending generation at every comma
    assert field(reader, "tokenizer.ggml.bos_token_id") == field(reader, "tokenizer.ggml.eos_token_id") == n
    assert field(reader, "tokenizer.ggml.suppress_tokens") == [n]
    assert field(reader, "tokenizer.ggml.add_bos_token") is False


def test_gguf_bpe_merges_are_a_b_strings_whichever_form_the_tokenizer_json_has(tmp_path, bpe):
    assert all(isinstance(m, list) for m in json_merges(bpe))  # this version of tokenizers writes pairs
    older = BPETokenizer.from_json(bpe.to_dict()["json"])
    as_strings = json.loads(bpe.to_dict()["json"])
    as_strings["model"]["merges"] = [" ".join(m) for m in as_strings["model"]["merges"]]  # as versions < 0.20 did
    older.to_dict = lambda: {**bpe.to_dict(), "json": json.dumps(as_strings)}
    model = tiny_gpt(vocab_size=bpe.vocab_size)
    want = field(exported(tmp_path, model, bpe), "tokenizer.ggml.merges")
    assert field(exported(tmp_path, model, older), "tokenizer.ggml.merges") == want


def test_gguf_bpe_end_token_has_a_zero_embedding_and_the_mean_output_row(tmp_path, bpe):
    model = tiny_gpt(vocab_size=bpe.vocab_size)
    got, want = read_tensors(exported(tmp_path, model, bpe)), expected_tensors(model)
    assert got.keys() == want.keys()
    for name, (_, data) in got.items():
        rows = data[: bpe.vocab_size] if name in ("token_embd.weight", "output.weight") else data
        assert np.array_equal(rows, want[name]), name
    assert not got["token_embd.weight"][1][-1].any()  # never an input
    # so its logit is the mean of the model's logits: never above the largest, never the greedy choice
    np.testing.assert_allclose(got["output.weight"][1][-1], want["output.weight"].mean(axis=0), rtol=1e-6)


def test_a_forward_written_from_llama_cpp_gpt2_graph_on_the_gguf_tensors_gives_quill_logits(tmp_path):
    """Checks the layout, not only the names: (out, in) matrices, q/k/v stacked in that order along qkv's rows,
    heads contiguous in each, as llama.cpp's gpt2 graph (src/models/gpt2.cpp) uses them. Its GELU is the tanh
    form; ours is exact, so the logits agree closely but not bit for bit."""
    model = tiny_gpt()
    reader = exported(tmp_path, model)
    t = {k: v for k, (_, v) in read_tensors(reader).items()}
    eps, n_head = field(reader, "gpt2.attention.layer_norm_epsilon"), model.config.n_head
    ids = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    T, D = len(ids), model.config.hidden_size

    def norm(x, name):
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
        return x * t[name + ".weight"] + t[name + ".bias"]

    def linear(x, name):
        return x @ t[name + ".weight"].T + t[name + ".bias"]

    def gelu_tanh(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    h = t["token_embd.weight"][ids] + t["position_embd.weight"][:T]
    for i in range(model.config.n_layer):
        qkv = linear(norm(h, f"blk.{i}.attn_norm"), f"blk.{i}.attn_qkv")
        q, k, v = (qkv[:, j * D : (j + 1) * D].reshape(T, n_head, -1).transpose(1, 0, 2) for j in range(3))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(D // n_head) + np.triu(np.full((T, T), -np.inf), 1)
        att = np.exp(scores - scores.max(-1, keepdims=True))
        y = (att / att.sum(-1, keepdims=True)) @ v  # (nh, T, hs)
        h = h + linear(y.transpose(1, 0, 2).reshape(T, D), f"blk.{i}.attn_output")
        h = h + linear(gelu_tanh(linear(norm(h, f"blk.{i}.ffn_norm"), f"blk.{i}.ffn_up")), f"blk.{i}.ffn_down")
    logits = norm(h, "output_norm") @ t["output.weight"].T
    with torch.no_grad():
        want = model(torch.tensor(ids)[None])[0][0].numpy()
    np.testing.assert_allclose(logits, want, atol=1e-4)


def export_cli(tmp_path, checkpoint, *extra):
    out = tmp_path / "out.gguf"
    main([str(checkpoint), "--format", "gguf", "--out", str(out), *extra])
    return out


def test_export_refuses_an_lstm_checkpoint_in_one_line(tmp_path):
    save_checkpoint(tmp_path / "lstm.safetensors", tiny_lstm(), CharTokenizer(CHARS), {})
    with pytest.raises(SystemExit, match="is an LSTM; only GPT checkpoints export") as e:
        export_cli(tmp_path, tmp_path / "lstm.safetensors")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out.gguf").exists()


def test_export_refuses_to_overwrite_an_existing_file_unless_told(tmp_path):
    save_checkpoint(tmp_path / "m.safetensors", tiny_gpt(), CharTokenizer(CHARS), {})
    (tmp_path / "out.gguf").write_bytes(b"keep me")
    with pytest.raises(SystemExit, match="out.gguf exists; pass --overwrite"):
        export_cli(tmp_path, tmp_path / "m.safetensors")
    assert (tmp_path / "out.gguf").read_bytes() == b"keep me"
    out = export_cli(tmp_path, tmp_path / "m.safetensors", "--overwrite")
    assert field(gguf.GGUFReader(out), "general.name") == "m"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


@pytest.mark.parametrize("content", [None, b"\x00" * 64], ids=["missing", "corrupt"])
def test_export_names_a_missing_or_corrupt_checkpoint(tmp_path, content):
    path = tmp_path / "m.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit, match=f"cannot load the checkpoint: {path}") as e:
        export_cli(tmp_path, path)
    assert "Traceback" not in str(e.value)


@pytest.mark.parametrize(
    ("fmt", "extra", "written"),
    [("gguf", [], "my-run-f32.gguf"), ("gguf", ["--dtype", "q8_0"], "my-run-q8_0.gguf"), ("hf", [], "my-run-hf")],
)
def test_export_without_out_writes_into_the_exports_folder_named_after_the_checkpoint(
    fmt, extra, written, tmp_path, monkeypatch, capsys
):
    save_checkpoint(tmp_path / "my-run" / "model.safetensors", tiny_gpt(), CharTokenizer(CHARS), {})
    monkeypatch.chdir(tmp_path)
    main(["my-run", "--format", fmt, *extra])
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == [written]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exports", "my-run"]  # nothing beside them
    assert f"wrote exports/{written}" in capsys.readouterr().out


def readme_gguf_commands():
    """The export command and the llama-server command of README.md's GGUF section, as words."""
    section = (REPO / "README.md").read_text().split("## Run it in llama.cpp (GGUF export)", 1)[1]
    block = re.search(r"^```sh\n(.*?)^```", section, re.S | re.M).group(1)
    export, server = (shlex.split(line, comments=True) for line in block.splitlines()[:2])
    return export, server


@pytest.mark.slow
def test_export_command_as_the_readme_prints_it_writes_the_file_its_llama_server_line_runs(tmp_path):
    export, server = readme_gguf_commands()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "shakespeare-gpt").symlink_to(BUNDLED_GPT)
    cmd = [sys.executable, *export[export.index("-m") :]]
    proc = subprocess.run(cmd, cwd=tmp_path, env=trainer_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert shlex.join(server) in proc.stdout  # the export prints the README's llama-server line
    model, _, _ = load_checkpoint(BUNDLED_GPT)
    reader = gguf.GGUFReader(tmp_path / server[server.index("-m") + 1])
    assert field(reader, "general.name") == "shakespeare-gpt"
    assert len(reader.tensors) == len(expected_tensors(model))
    again = subprocess.run(cmd, cwd=tmp_path, env=trainer_env(), capture_output=True, text=True)
    assert again.returncode == 1 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
