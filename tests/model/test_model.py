"""The model specification, item by item: attention, MLP, Block, GPT, its optimizer and generate, the LSTM."""

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TINY_GPT, TINY_LSTM, tiny_gpt, tiny_lstm

from model import GPT, MLP, Block, CausalSelfAttention, MultiHeadCausalSelfAttention
from model import device as device_module
from model.device import pick_device
from model.gpt import GPTConfig, KVCache
from model.optim import configure_adamw

D, T, N = 32, 10, 3


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


class Recorder(nn.Module):
    """Stands in for a dropout: remembers its input and returns `out(input)`."""

    def __init__(self, out=lambda x: x):
        super().__init__()
        self.out, self.seen = out, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.out(x)


def zeros_like(x):
    return torch.zeros_like(x)


def changes_before(module, x, t):
    """Largest change in outputs at positions <= t when every input after t is replaced."""
    y1 = module(x)
    x2 = x.clone()
    future = x2[:, t + 1 :]
    x2[:, t + 1 :] = torch.randn_like(future) if x.is_floating_point() else torch.randint_like(future, 0, 40)
    y2 = module(x2)
    return (y1[:, : t + 1] - y2[:, : t + 1]).abs().max().item(), (y1[:, t + 1 :] - y2[:, t + 1 :]).abs().max().item()


def explicit(model):
    for m in model.modules():
        if isinstance(m, MultiHeadCausalSelfAttention):
            m.fused = False
    return model


# 1. CausalSelfAttention


def test_single_head_attention_maps_n_t_d_to_n_t_d():
    assert CausalSelfAttention(D)(torch.randn(N, T, D)).shape == (N, T, D)


def test_single_head_attention_has_only_three_bias_free_projections():
    att = CausalSelfAttention(D)
    assert sum(p.numel() for p in att.parameters()) == 3 * D * D
    assert all(m.bias is None for m in att.modules() if isinstance(m, nn.Linear))


def test_single_head_attention_computes_masked_softmax_qkt_over_sqrt_d_times_v():
    att, x = CausalSelfAttention(D), torch.randn(N, T, D)
    q, k, v = x @ att.W_Q.weight.T, x @ att.W_K.weight.T, x @ att.W_V.weight.T
    scores = q @ k.transpose(1, 2) / math.sqrt(D)
    scores[:, torch.ones(T, T, dtype=torch.bool).triu(1)] = float("-inf")
    torch.testing.assert_close(att(x), torch.softmax(scores, dim=-1) @ v)


@pytest.mark.parametrize("t", [0, 4, T - 2])
def test_single_head_attention_output_at_t_ignores_inputs_after_t(t):
    before, after = changes_before(CausalSelfAttention(D), torch.randn(N, T, D), t)
    assert before == 0.0
    assert after > 0.0  # the perturbation was real


# 2. MultiHeadCausalSelfAttention


def test_multi_head_attention_maps_n_t_d_to_n_t_d():
    assert MultiHeadCausalSelfAttention(D, 4, 0.0)(torch.randn(N, T, D)).shape == (N, T, D)


def test_multi_head_attention_when_hidden_not_divisible_by_heads_raises_value_error():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadCausalSelfAttention(30, 4, 0.0)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("t", [0, 5, T - 2])
def test_multi_head_attention_output_at_t_ignores_inputs_after_t(fused, t):
    att = MultiHeadCausalSelfAttention(D, 4, 0.0)
    att.fused = fused
    before, after = changes_before(att, torch.randn(N, T, D), t)
    assert before < 1e-6
    assert after > 0.0


def test_multi_head_attention_fused_path_equals_explicit_path():
    att, x = MultiHeadCausalSelfAttention(D, 4, 0.1).eval(), torch.randn(N, T, D)
    fused = att(x)
    att.fused = False
    torch.testing.assert_close(fused, att(x), rtol=1e-5, atol=1e-6)


def test_multi_head_attention_heads_attend_separately_and_recombine():
    # One head per 8 channels: the explicit per-head computation written out with a loop.
    att, x = explicit(MultiHeadCausalSelfAttention(D, 4, 0.0)), torch.randn(N, T, D)
    q, k, v = att.qkv(x).split(D, dim=2)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    heads = []
    for h in range(4):
        s = slice(8 * h, 8 * (h + 1))
        scores = (q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(8)).masked_fill(mask, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[..., s])
    torch.testing.assert_close(att(x), att.proj(torch.cat(heads, dim=-1)))


def test_multi_head_attention_first_dropout_sees_the_causal_softmax_weights():
    att = explicit(MultiHeadCausalSelfAttention(D, 4, 0.0))
    att.attn_dropout = Recorder()
    att(torch.randn(N, T, D))
    (weights,) = att.attn_dropout.seen
    assert weights.shape == (N, 4, T, T)
    torch.testing.assert_close(weights.sum(-1), torch.ones(N, 4, T))  # rows of a softmax
    assert (weights[..., torch.ones(T, T, dtype=torch.bool).triu(1)] == 0).all()  # causal


def test_multi_head_attention_first_dropout_output_weights_the_values():
    # If the dropped-out weights are all zero, nothing reaches the output projection but its bias.
    att = explicit(MultiHeadCausalSelfAttention(D, 4, 0.0))
    att.attn_dropout = Recorder(zeros_like)
    torch.testing.assert_close(att(torch.randn(N, T, D)), att.proj.bias.expand(N, T, D))


def test_multi_head_attention_second_dropout_is_the_last_step_after_the_projection():
    att, x = MultiHeadCausalSelfAttention(D, 4, 0.0), torch.randn(N, T, D)
    expected = att(x)
    att.resid_dropout = Recorder(zeros_like)
    assert (att(x) == 0).all()
    torch.testing.assert_close(att.resid_dropout.seen[0], expected)


def test_multi_head_attention_fused_path_applies_dropout_only_in_training():
    att, x = MultiHeadCausalSelfAttention(D, 4, 0.5), torch.randn(N, T, D)
    reference = explicit(MultiHeadCausalSelfAttention(D, 4, 0.0))
    reference.load_state_dict(att.state_dict())
    torch.testing.assert_close(att.eval()(x), reference(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(att.train()(x), reference(x))


# 3. MLP


def test_mlp_is_linear_4d_gelu_linear_d():
    mlp = MLP(D, 0.0)
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(D, 4 * D), (4 * D, D)]
    x = torch.randn(N, T, D)
    torch.testing.assert_close(mlp(x), mlp.proj(F.gelu(mlp.fc(x))))


def test_mlp_dropout_is_applied_to_its_output():
    mlp, x = MLP(D, 0.0), torch.randn(N, T, D)
    expected = mlp(x)
    mlp.dropout = Recorder(zeros_like)
    assert (mlp(x) == 0).all()
    torch.testing.assert_close(mlp.dropout.seen[0], expected)


# 4. Block


def test_block_is_pre_layernorm_with_two_residuals():
    block, x = Block(D, 4, 0.0), torch.randn(N, T, D)
    assert [type(m) for m in block.children()] == [nn.LayerNorm, MultiHeadCausalSelfAttention, nn.LayerNorm, MLP]
    h = x + block.attn(block.ln1(x))
    torch.testing.assert_close(block(x), h + block.mlp(block.ln2(h)))


# 5. GPT


def test_gpt_forward_returns_n_t_v_logits_and_cross_entropy():
    gpt = tiny_gpt()
    x, y = torch.randint(0, 40, (N, 16)), torch.randint(0, 40, (N, 16))
    logits, loss = gpt(x, y)
    assert logits.shape == (N, 16, 40)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 40), y.view(-1)))


def test_gpt_forward_without_targets_returns_logits_and_none():
    logits, loss = tiny_gpt()(torch.randint(0, 40, (N, 5)))
    assert logits.shape == (N, 5, 40) and loss is None


@pytest.mark.parametrize("make", [lambda: tiny_gpt(), lambda: tiny_lstm()], ids=["gpt", "lstm"])
def test_forward_accepts_targets_that_are_a_strided_slice_of_the_input(make):
    model, x = make(), torch.randint(0, 40, (N, 16))
    logits, loss = model(x[:, :-1], x[:, 1:])  # x[:, 1:] is not contiguous
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 40), x[:, 1:].contiguous().view(-1)))


def test_gpt_forward_when_longer_than_context_raises_value_error():
    with pytest.raises(ValueError, match="context_size"):
        tiny_gpt()(torch.randint(0, 40, (1, 17)))


@pytest.mark.parametrize("fused", [True, False])
def test_gpt_logits_at_t_ignore_tokens_after_t(fused):
    gpt = tiny_gpt().eval()
    if not fused:
        explicit(gpt)
    before, after = changes_before(lambda x: gpt(x)[0], torch.randint(0, 40, (N, 16)), 7)
    assert before < 1e-5
    assert after > 0.0


def test_gpt_fused_path_equals_explicit_path():
    gpt, x = tiny_gpt().eval(), torch.randint(0, 40, (N, 16))
    fused = gpt(x)[0]
    torch.testing.assert_close(fused, explicit(gpt)(x)[0], rtol=1e-5, atol=1e-5)


def test_gpt_embeds_tokens_plus_positions_then_dropout():
    gpt, x = tiny_gpt(), torch.randint(0, 40, (N, 9))
    gpt.drop = Recorder()
    gpt(x)
    torch.testing.assert_close(gpt.drop.seen[0], gpt.tok_emb(x) + gpt.pos_emb(torch.arange(9)))


def test_gpt_uses_the_same_dropout_rate_everywhere():
    gpt = tiny_gpt(dropout=0.3)
    rates = [m.p for m in gpt.modules() if isinstance(m, nn.Dropout)]
    assert rates == [0.3] * (1 + 3 * TINY_GPT["n_layer"])  # embeddings, then two in attention, one in the MLP
    assert all(m.attn_dropout.p == 0.3 for m in gpt.modules() if isinstance(m, MultiHeadCausalSelfAttention))


def test_gpt_output_layer_is_the_token_embedding():
    gpt = tiny_gpt()
    assert gpt.lm_head.weight is gpt.tok_emb.weight
    assert gpt.lm_head.bias is None


@pytest.fixture(scope="module")
def wide_gpt():
    """Big enough that sample statistics of the initial weights are tight."""
    torch.manual_seed(0)
    return GPT(vocab_size=256, context_size=256, hidden_size=256, n_layer=4, n_head=4, dropout=0.0)


def test_gpt_init_draws_weights_with_std_0_02(wide_gpt):
    for name, p in wide_gpt.named_parameters():
        if p.dim() >= 2 and not name.endswith("mlp.proj.weight"):
            assert abs(p.std().item() - 0.02) < 0.0015, name
            assert abs(p.mean().item()) < 0.001, name


def test_gpt_init_scales_mlp_output_layers_by_depth(wide_gpt):
    expected = 0.02 / math.sqrt(2 * 4)
    for block in wide_gpt.blocks:
        assert abs(block.mlp.proj.weight.std().item() - expected) / expected < 0.02
    assert all(b.attn.proj.weight.std().item() > 0.019 for b in wide_gpt.blocks)  # only the MLP's is scaled


def test_gpt_init_sets_every_bias_to_zero(wide_gpt):
    biases = [p for name, p in wide_gpt.named_parameters() if name.endswith("bias")]
    assert len(biases) == 4 * 6 + 1  # per block: 2 LayerNorms, qkv, attention proj, 2 MLP layers; final LayerNorm
    assert all((b == 0).all() for b in biases)


# 6. configure_optimizers


def test_gpt_optimizer_is_adamw_with_decayed_matrices_and_undecayed_vectors():
    gpt = tiny_gpt()
    opt = gpt.configure_optimizers(weight_decay=0.1, learning_rate=3e-4, betas=(0.9, 0.95))
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    assert all(g["lr"] == 3e-4 and tuple(g["betas"]) == (0.9, 0.95) for g in opt.param_groups)


def test_gpt_optimizer_holds_each_parameter_once_and_the_tied_matrix_once():
    gpt = tiny_gpt()
    grouped = [id(p) for g in gpt.configure_optimizers(0.1, 1e-3, (0.9, 0.99)).param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in gpt.parameters()}
    assert grouped.count(id(gpt.tok_emb.weight)) == 1


def test_gpt_and_lstm_optimizers_are_the_one_shared_adamw():
    for net in (tiny_gpt(), tiny_lstm()):
        ours, shared = net.configure_optimizers(0.1, 1e-3, (0.9, 0.99)), configure_adamw(net, 0.1, 1e-3, (0.9, 0.99))
        assert [len(g["params"]) for g in ours.param_groups] == [len(g["params"]) for g in shared.param_groups]
        assert [g["weight_decay"] for g in ours.param_groups] == [0.1, 0.0]


def test_gpt_config_holds_the_constructor_arguments_and_reads_by_name_or_key():
    gpt = tiny_gpt()
    assert gpt.config == GPTConfig(**TINY_GPT)
    assert dataclasses.asdict(gpt.config) == {**TINY_GPT, "gelu": "exact"}  # the default GELU form
    assert gpt.config.n_head == TINY_GPT["n_head"]
    assert dataclasses.asdict(tiny_lstm().config) == TINY_LSTM


def test_pick_device_auto_is_cpu_without_an_accelerator_and_a_device_absent_here_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module, "mps_available", lambda: False)
    assert pick_device("auto") == "cpu" and pick_device("cpu") == "cpu"
    for name, says in (
        ("cuda:1", "no such CUDA device"),
        ("mps", "MPS is not available"),
        ("gpu", "not a torch device"),
    ):
        with pytest.raises(ValueError, match=says):
            pick_device(name)


def test_pick_device_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(device_module, "mps_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == "mps" and pick_device("mps") == "mps"


# 7. generate


def test_gpt_generate_extends_every_row_by_max_new_tokens():
    x = torch.randint(0, 40, (N, 5))
    out = tiny_gpt().generate(x, max_new_tokens=7)
    assert out.shape == (N, 12)
    assert torch.equal(out[:, :5], x)
    assert out.dtype == torch.long and out.min() >= 0 and out.max() < 40


def test_gpt_generate_past_the_context_reads_only_the_last_context_size_tokens():
    gpt = tiny_gpt()
    lengths = []
    gpt.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    out = gpt.generate(torch.zeros(2, 1, dtype=torch.long), max_new_tokens=40)
    assert out.shape == (2, 41)
    assert max(lengths) == 16


def test_gpt_generate_is_unaffected_by_tokens_beyond_the_context():
    gpt = tiny_gpt()
    prompt = torch.randint(0, 40, (2, 30))
    torch.manual_seed(1)
    long = gpt.generate(prompt, 10)
    torch.manual_seed(1)
    cropped = gpt.generate(prompt[:, -16:], 10)
    assert torch.equal(long[:, 30:], cropped[:, 16:])


def peaked_gpt():
    """A GPT whose next-token distribution has real structure, so temperature matters."""
    gpt = tiny_gpt()
    with torch.no_grad():
        gpt.tok_emb.weight.mul_(10)
    return gpt


def test_gpt_generate_at_low_temperature_picks_the_argmax():
    gpt, prompt = peaked_gpt(), torch.randint(0, 40, (1, 8)).repeat(64, 1)
    argmax = gpt(prompt[:1])[0][0, -1].argmax()
    out = gpt.generate(prompt, 1, temperature=1e-4)
    assert (out[:, -1] == argmax).all()


def test_gpt_generate_at_high_temperature_samples_more_diverse_tokens():
    gpt, prompt = peaked_gpt(), torch.randint(0, 40, (1, 8)).repeat(256, 1)
    distinct = {t: gpt.generate(prompt, 1, temperature=t)[:, -1].unique().numel() for t in (0.5, 1.0, 5.0)}
    assert distinct[0.5] < distinct[1.0] < distinct[5.0]


@pytest.mark.parametrize("training", [True, False])
def test_gpt_generate_leaves_train_or_eval_mode_as_it_found_it(training):
    gpt = tiny_gpt().train(training)
    gpt.generate(torch.zeros(1, 1, dtype=torch.long), 3)
    assert gpt.training is training
    assert all(m.training is training for m in gpt.modules())


def test_gpt_generate_samples_without_dropout_even_from_training_mode():
    gpt, prompt = tiny_gpt(dropout=0.5), torch.randint(0, 40, (4, 8))
    torch.manual_seed(3)
    from_train = gpt.train().generate(prompt, 12)
    torch.manual_seed(3)
    from_eval = gpt.eval().generate(prompt, 12)
    assert torch.equal(from_train, from_eval)


def test_gpt_generate_draws_from_the_global_generator_so_its_seed_decides_the_tokens():
    gpt, prompt = tiny_gpt(), torch.zeros(2, 1, dtype=torch.long)
    torch.manual_seed(7)
    a = gpt.generate(prompt, 20)
    torch.manual_seed(7)
    assert torch.equal(a, gpt.generate(prompt, 20))
    torch.manual_seed(8)
    assert not torch.equal(a, gpt.generate(prompt, 20))


# 8. LSTM


def test_lstm_forward_returns_logits_and_cross_entropy():
    lstm = tiny_lstm()
    x, y = torch.randint(0, 40, (N, 12)), torch.randint(0, 40, (N, 12))
    logits, loss = lstm(x, y)
    assert logits.shape == (N, 12, 40)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 40), y.view(-1)))
    assert lstm(x)[1] is None


def test_lstm_logits_at_t_ignore_tokens_after_t():
    lstm = tiny_lstm().eval()
    before, after = changes_before(lambda x: lstm(x)[0], torch.randint(0, 40, (N, 12)), 5)
    assert before < 1e-6
    assert after > 0.0


def test_lstm_generate_extends_every_row_and_restores_the_mode():
    lstm, x = tiny_lstm().train(), torch.randint(0, 40, (N, 4))
    out = lstm.generate(x, max_new_tokens=50)  # no context limit: the state carries everything
    assert out.shape == (N, 54) and torch.equal(out[:, :4], x)
    assert lstm.training


def test_lstm_generate_with_carried_state_equals_rereading_the_whole_sequence():
    lstm, x = tiny_lstm().eval(), torch.randint(0, 40, (2, 4))
    torch.manual_seed(5)
    fast = lstm.generate(x, 15, temperature=0.8)
    torch.manual_seed(5)
    slow = x
    with torch.no_grad():
        for _ in range(15):
            probs = torch.softmax(lstm(slow)[0][:, -1] / 0.8, dim=-1)
            slow = torch.cat([slow, torch.multinomial(probs, 1)], dim=1)
    assert torch.equal(fast, slow)


def test_lstm_optimizer_decays_matrices_only_and_holds_each_parameter_once():
    lstm = tiny_lstm()
    decay, no_decay = lstm.configure_optimizers(0.1, 1e-3, (0.9, 0.99)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    grouped = [id(p) for p in decay["params"] + no_decay["params"]]
    assert sorted(grouped) == sorted(id(p) for p in lstm.parameters())


def test_lstm_forward_with_a_state_carries_it_on_in_place():
    lstm, x = tiny_lstm().eval(), torch.randint(0, 40, (N, 12))
    state = lstm.zero_state(N)
    first, _ = lstm(x[:, :5], state=state)
    after_first = [s.clone() for s in state]
    rest, _ = lstm(x[:, 5:], state=state)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), lstm(x)[0])
    assert not torch.equal(state[0], after_first[0])  # updated again by the second call


# 9. The cached forward (what the serving engine runs)


def storage(gpt, rows):
    """Keys and values for `rows` rows, full of junk that a forward must never read before writing it."""
    c = gpt.config
    shape = (c.n_layer, rows, c.n_head, c.context_size, c.hidden_size // c.n_head)
    return torch.randn(shape) * 100, torch.randn(shape) * 100


def cached(k, v, lengths):
    return KVCache(k, v, torch.tensor(lengths), max(lengths))


@pytest.mark.parametrize("fused", [True, False])
def test_gpt_cached_forward_chunk_then_token_by_token_equals_the_full_forward(fused):
    gpt, x = tiny_gpt().eval(), torch.randint(0, 40, (N, 16))
    if not fused:
        explicit(gpt)
    k, v = storage(gpt, N)
    steps = [gpt(x[:, :6], kv_cache=cached(k, v, [0] * N))[0]]
    for t in range(6, 16):
        steps.append(gpt(x[:, t : t + 1], kv_cache=cached(k, v, [t] * N))[0])
    torch.testing.assert_close(torch.cat(steps, dim=1), gpt(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_gpt_cached_forward_of_rows_with_different_lengths_equals_each_row_alone(fused):
    gpt, lengths = tiny_gpt().eval(), [3, 9, 1]
    if not fused:
        explicit(gpt)
    rows = [torch.randint(0, 40, (1, n + 1)) for n in lengths]
    k, v = storage(gpt, len(lengths))  # junk past each row's length: must be ignored
    for i, (row, n) in enumerate(zip(rows, lengths)):
        gpt(row[:, :n], kv_cache=cached(k[:, i : i + 1], v[:, i : i + 1], [0]))
    last, _ = gpt(torch.cat([row[:, -1:] for row in rows]), kv_cache=cached(k, v, lengths))  # (N, 1, V)
    for i, row in enumerate(rows):
        torch.testing.assert_close(last[i, 0], gpt(row)[0][0, -1], rtol=1e-5, atol=1e-5)


def test_gpt_cached_forward_with_last_computes_only_those_positions_logits(monkeypatch):
    gpt, x = tiny_gpt().eval(), torch.randint(0, 40, (3, 7))
    full, _ = gpt(x)
    heads = []
    monkeypatch.setattr(gpt.lm_head, "forward", lambda h: heads.append(h.shape) or F.linear(h, gpt.lm_head.weight))
    k, v = storage(gpt, 3)
    last = torch.tensor([6, 2, 0])  # rows padded past these: a prefill of prompts of lengths 7, 3 and 1
    logits, _ = gpt(x, kv_cache=KVCache(k, v, torch.zeros(3, dtype=torch.long), 0, last))
    assert logits.shape == (3, 1, 40) and heads == [(3, 1, 32)]  # the head saw 3 positions, not 21
    torch.testing.assert_close(logits[:, 0], full[torch.arange(3), last], rtol=1e-5, atol=1e-5)


def test_gpt_cached_forward_writes_each_rows_keys_at_its_own_length_only():
    gpt, lengths = tiny_gpt().eval(), [2, 5]
    k, v = storage(gpt, len(lengths))
    k0 = k.clone()
    gpt(torch.randint(0, 40, (2, 3)), kv_cache=cached(k, v, lengths))
    written = (k != k0).any(dim=(0, 2, 4))  # (N, context): which positions changed
    assert written[0].nonzero().flatten().tolist() == [2, 3, 4]
    assert written[1].nonzero().flatten().tolist() == [5, 6, 7]


def test_gpt_cached_forward_past_the_context_raises_value_error():
    gpt = tiny_gpt()
    k, v = storage(gpt, 1)
    with pytest.raises(ValueError, match="context_size"):
        gpt(torch.randint(0, 40, (1, 3)), kv_cache=cached(k, v, [14]))
