"""GPT-2 import: a small random GPT-2 made with `transformers` and a tokenizer trained with `tokenizers`,
imported and checked against transformers' own logits, greedy continuation and, served, its text."""

import dataclasses
import json

import pytest
import torch
from fastapi.testclient import TestClient
from helpers import END, gpt2_tokenizer, save_gpt2

from app.main import create_app
from app.settings import Settings
from model import BPETokenizer, load_checkpoint, save_checkpoint
from model.checkpoint import CheckpointError, read_safetensors, write_safetensors
from model.export import main as export_main
from model.gpt import GPT
from model.import_hf import main

transformers = pytest.importorskip("transformers")

PROMPTS = ["ROMEO:\nWhat, ho!", "Her café, her crème"]  # characters of two bytes too
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    hf, tokenizer = save_gpt2(root / "hf")
    main([str(root / "hf"), "--out", str(root / "gpt2")])
    return hf, tokenizer, root / "gpt2"


def batch(tokenizer):
    ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    n = min(map(len, ids))
    return torch.tensor([i[:n] for i in ids])


def test_imported_gpt2_gives_transformers_logits(imported):
    hf, tokenizer, run = imported
    model, _, meta = load_checkpoint(run)
    assert model.config.gelu == "tanh"
    x = batch(tokenizer)
    with torch.no_grad():
        diff = (model(x)[0] - hf(x).logits).abs().max().item()
    assert diff <= 1e-4
    assert meta["imported_from"]["path"] == str((run.parent / "hf").resolve())
    assert len(meta["imported_from"]["sha256"]) == 64


def test_imported_tokenizer_encodes_as_gpt2s_and_the_end_token_decodes_to_its_text(imported):
    _, tokenizer, run = imported
    _, ours, _ = load_checkpoint(run)
    for text in [*PROMPTS, "Zoë ⚡"]:
        assert ours.encode(text) == tokenizer.encode(text, add_special_tokens=False).ids
        assert ours.decode(ours.encode(text)) == text
    assert ours.decode([tokenizer.token_to_id(END)]) == END


def test_greedy_continuation_and_served_text_equal_transformers_generate(imported):
    hf, tokenizer, run = imported
    model, ours, _ = load_checkpoint(run)
    prompt = PROMPTS[0]
    x = torch.tensor([ours.encode(prompt)])
    want = hf.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = want[0, x.shape[1] :].tolist()
    got = x
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            got = torch.cat([got, model(got)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert got[0, x.shape[1] :].tolist() == want
    with TestClient(create_app(Settings(_env_file=None, checkpoints=[str(run)]))) as client:
        body = {"model": run.name, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
        r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tokenizer.decode(want, skip_special_tokens=False)


def test_exact_gelu_gpt2_imports_as_exact(tmp_path):
    hf, tokenizer = save_gpt2(tmp_path / "hf", activation="gelu")
    main([str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
    model, _, _ = load_checkpoint(tmp_path / "run")
    assert model.config.gelu == "exact"
    tanh = GPT(**{**dataclasses.asdict(model.config), "gelu": "tanh"})
    tanh.load_state_dict(model.state_dict())
    x = batch(tokenizer)
    with torch.no_grad():
        assert (model(x)[0] - hf(x).logits).abs().max().item() <= 1e-4
        # the weights are large enough that the other GELU form would fail the check above
        assert (tanh.eval()(x)[0] - hf(x).logits).abs().max().item() > 1e-4


def edit_config(hf_dir, **changes):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(model_type="llama", architectures=["LlamaForCausalLM"]), "model_type 'llama'"),
        (dict(architectures=["GPT2ForSequenceClassification"]), "GPT2ForSequenceClassification"),
        (dict(activation_function="relu"), "activation_function 'relu'"),
        (dict(n_inner=48), "n_inner 48"),
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn"),
        (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon"),
        (dict(vocab_size=400), "vocab_size is 400"),
    ],
)
def test_other_architectures_and_variants_are_refused_naming_them_and_nothing_is_written(tmp_path, change, message):
    save_gpt2(tmp_path / "hf")
    edit_config(tmp_path / "hf", **change)
    with pytest.raises(SystemExit, match=message) as e:
        main([str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_a_missing_file_is_refused_naming_it(tmp_path, missing):
    save_gpt2(tmp_path / "hf")
    (tmp_path / "hf" / missing).unlink()
    with pytest.raises(SystemExit, match=f"lacks {missing}"):
        main([str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_pickle_only_directory_is_refused_without_unpickling(tmp_path):
    hf, _ = save_gpt2(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(SystemExit, match="only pytorch_model.bin .a pickle.; weights are only read from model.safet"):
        main([str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_an_existing_run_is_kept_unless_overwrite(imported, capsys):
    _, _, run = imported
    before = (run / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main([str(run.parent / "hf"), "--out", str(run)])
    assert (run / "model.safetensors").stat().st_mtime_ns == before
    main([str(run.parent / "hf"), "--out", str(run), "--overwrite"])
    assert "python -m app --checkpoint" in capsys.readouterr().out


def test_an_imported_gpt2_exports_back_to_transformers_with_its_end_token(imported, tmp_path):
    hf, tokenizer, run = imported
    export_main([str(run), "--format", "hf", "--out", str(tmp_path / "back")])
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    assert back.config.activation_function == "gelu_new"
    assert back.config.eos_token_id == tokenizer.token_to_id(END) == hf.config.eos_token_id
    x = batch(tokenizer)
    with torch.no_grad():
        assert (back(x).logits - hf(x).logits).abs().max().item() <= 1e-4
    hf_tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "back")
    assert hf_tokenizer.eos_token == END
    assert hf_tokenizer(PROMPTS[1]).input_ids == tokenizer.encode(PROMPTS[1], add_special_tokens=False).ids


def test_a_checkpoint_written_before_the_gelu_field_loads_as_exact_and_a_bad_form_is_named(tmp_path):
    tokenizer = BPETokenizer(gpt2_tokenizer())
    save_checkpoint(tmp_path / "new.safetensors", GPT(tokenizer.vocab_size, 16, 32, 1, 2, 0.0), tokenizer, {})
    tensors, meta = read_safetensors(tmp_path / "new.safetensors")
    del meta["config"]["gelu"]
    write_safetensors(tmp_path / "old.safetensors", tensors, meta)
    model, _, _ = load_checkpoint(tmp_path / "old.safetensors")
    assert model.config.gelu == "exact" and model.blocks[0].mlp.gelu.approximate == "none"
    write_safetensors(tmp_path / "bad.safetensors", tensors, {**meta, "config": {**meta["config"], "gelu": "relu"}})
    with pytest.raises(CheckpointError, match="gelu must be one of exact, tanh, not 'relu'"):
        load_checkpoint(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("config", ["[]", '{"chat_template": 3}', '{"chat_template": [1, {"name": "default"}]}'])
def test_a_malformed_tokenizer_config_is_refused_naming_it_or_has_no_template(tmp_path, config):
    save_gpt2(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(config)
    if config.startswith('{"chat_template": ['):  # a list with no usable default: no template, imported
        main([str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
        assert "chat_template" not in load_checkpoint(tmp_path / "run")[2]
        return
    with pytest.raises(SystemExit, match="tokenizer_config.json"):
        main([str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
