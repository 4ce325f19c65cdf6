"""Int8 weight-only quantization (model/quantize.py, QUILL_QUANTIZE=int8): every linear layer of a GPT holds an int8
weight with a scale per output channel; its logits stay close to float32's, and so its loss and greedy text; the
compiled decode step runs it and agrees with the eager forward."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import Recorder, tiny_gpt, tiny_lstm
from service_helpers import wait_until

from model.engine import Engine, Request
from model.gpt import GPT
from model.quantize import Int8Linear, check, parameter_count, quantize, quantize_rows, quantized
from model.sampling import SamplingParams


def pair(**shape):
    """A tiny random GPT in float32 and an int8 copy of it."""
    reference = tiny_gpt(**shape).eval()
    model = tiny_gpt(**shape).eval()
    return reference, quantize(model, "int8")


def test_every_linear_layer_holds_int8_weights_and_the_embedding_stays_float():
    reference, model = pair()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [] and quantized(model) == "int8" and quantized(reference) is None
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 1 + 4 * len(model.blocks)  # lm_head, and qkv, proj, fc, proj a block
    assert all(m.weight.dtype == torch.int8 and m.scale.dtype == torch.float32 for m in layers)
    assert model.tok_emb.weight.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()  # an int8 copy
    assert model.lm_head.dense is model.tok_emb.weight  # and the float matrix, still tied, for many rows
    assert all(m.dense is None for m in layers if m is not model.lm_head)
    assert parameter_count(model) == parameter_count(reference) == sum(p.numel() for p in reference.parameters())


def test_the_checkpoint_files_float_matrices_are_let_go(tmp_path):
    """A loaded checkpoint's weights map its file (model/checkpoint.py); once quantized, nothing maps it: the float
    matrices' pages go, and the float tensors kept are the model's own."""
    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.tokenizer import CharTokenizer

    path = tmp_path / "model.safetensors"
    save_checkpoint(path, tiny_gpt(vocab_size=8), CharTokenizer("abcdefgh"), {})

    def mapped():
        with open("/proc/self/maps") as maps:
            return sum(str(path) in line for line in maps)

    model, ids = load_checkpoint(path)[0], torch.tensor([[1, 2, 3]])
    assert mapped() > 0
    with torch.no_grad():
        logits = model(ids)[0]
        quantize(model, "int8")
        assert mapped() == 0
        assert model.lm_head.dense is model.tok_emb.weight  # still tied
        assert torch.allclose(model(ids)[0], logits, rtol=0.05, atol=0.05)


def test_a_row_is_rebuilt_within_half_a_step_of_its_scale():
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different sizes
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and (q.abs().amax(1) == 127).all()
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_the_logits_stay_close_to_float32s():
    reference, model = pair()
    x = torch.randint(0, 40, (3, 16))
    with torch.no_grad():
        a, b = reference(x)[0], model(x)[0]
    assert ((a - b).norm() / a.norm()).item() < 0.02
    model.lm_head.dense = None  # the head's int8 copy too, as a compiled decode step of a few rows computes
    with torch.no_grad():
        assert ((a - model(x)[0]).norm() / a.norm()).item() < 0.02
    y = torch.randint(0, 40, (3, 16))
    with torch.no_grad():
        losses = [F.cross_entropy(m(x)[0].reshape(-1, 40), y.reshape(-1)).item() for m in (reference, model)]
    assert abs(losses[0] - losses[1]) < 0.01


def test_greedy_text_is_float32s():
    reference, model = pair(context_size=64, hidden_size=64)
    prompt = [1, 2, 3, 4, 5]
    texts = [Engine(m, 2).generate(prompt, 12, temperature=0) for m in (reference, model)]
    assert texts[0] == texts[1]


def test_the_setting_takes_none_or_int8_and_names_a_bad_value():
    assert check(None) is None and check("none") is None and check("int8") == "int8"
    with pytest.raises(ValueError, match="'int4' is not one of none, int8"):
        check("int4")
    lstm = tiny_lstm()
    assert quantize(lstm, "int8") is lstm and quantized(lstm) is None  # only a GPT's layers are quantized
    model = tiny_gpt()
    assert quantize(model, None) is model and quantized(model) is None


@pytest.mark.slow
def test_the_compiled_step_runs_int8_weights_as_the_eager_forward_does(tmp_path, monkeypatch):
    """The decode step compiled ahead of time (model/compiled.py) over int8 weights: built for every batch size, and
    its text the eager int8 forward's, in the reduction form (batch 1) and past GEMV_ROWS (batch 2 here: the
    dequantized weights, the head's tied float matrix)."""
    monkeypatch.setattr("model.quantize.GEMV_ROWS", 1)
    monkeypatch.setattr("model.quantize.HEAD_ROWS", 1)
    model = quantize(tiny_gpt(context_size=64, hidden_size=64).eval(), "int8")
    compiled = Engine(model, 2, compiled=True, compile_folder=tmp_path)
    compiled.warm_up()
    assert compiled.compiled_sizes() == ([1, 2], [1, 2]), compiled.cache.step.failed
    eager = Engine(quantize(tiny_gpt(context_size=64, hidden_size=64).eval(), "int8"), 2)
    for engine in (compiled, eager):
        engine.texts = [engine.generate(p, 16, temperature=0) for p in ([1, 2, 3], [7] * 20)]  # batch 1
        reqs = [Request(p, SamplingParams(max_new_tokens=16, temperature=0), Recorder()) for p in ([1, 2], [9] * 9)]
        for req in reqs:
            engine.submit(req)
        while any(req.emit.finish is None for req in reqs):
            engine.step()
        engine.texts += [req.emit.tokens for req in reqs]  # batch 2
    assert compiled.texts == eager.texts


def test_a_quantized_model_has_gpts_interface():
    _, model = pair()
    assert isinstance(model, GPT)
    logits, loss = model(torch.randint(0, 40, (2, 8)), torch.randint(0, 40, (2, 8)))
    assert logits.shape == (2, 8, 40) and torch.isfinite(loss)


@pytest.mark.slow
def test_a_background_builder_compiles_the_int8_step_the_engine_loads(tmp_path):
    """As a server compiles (model/compiled.py's builder process, from the checkpoint file): the builder quantizes
    what it loads as the engine did (`--quantize int8`), so its packages' keys and constants are the engine's."""
    from model import load_checkpoint, save_checkpoint
    from model.tokenizer import ByteTokenizer

    weights = tmp_path / "model.safetensors"
    save_checkpoint(weights, tiny_gpt(256, context_size=32), ByteTokenizer(), {})
    model = quantize(load_checkpoint(weights)[0], "int8")
    engine = Engine(model, 2, compiled=True, compile_folder=tmp_path / "kept", weights=weights, threads=1)
    engine.start()
    try:
        built = lambda: engine.compiled_sizes() == ([1, 2], [1, 2]) and not engine.cache.step.building  # noqa: E731
        assert wait_until(built, timeout=600), engine.cache.step.failed
        text = engine.generate([1, 2, 3], 20, temperature=0)
    finally:
        engine.stop()
    assert text == Engine(quantize(load_checkpoint(weights)[0], "int8"), 2).generate([1, 2, 3], 20, temperature=0)
    assert len(list((tmp_path / "kept").glob("decode-*.pt2"))) == 2
