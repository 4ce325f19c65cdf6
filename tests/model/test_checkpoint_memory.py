"""A checkpoint's weights are held once: load_checkpoint builds the model on the meta device and gives it the file's
tensors (no random initialisation to allocate and overwrite); describe_checkpoint reads the header alone."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO, tiny_gpt, tiny_lstm, trainer_env

from model import CharTokenizer, CheckpointError, load_checkpoint, save_checkpoint
from model.checkpoint import build_model, describe_checkpoint, load_model_tensors, read_safetensors, write_safetensors

CHARS = "abcdefghijklmnopqrstuvwxyz .,;:!?'\n-ABCD"  # 40 characters, to match the tiny configs


def saved(tmp_path, kind):
    model = (tiny_gpt() if kind == "gpt" else tiny_lstm()).eval()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, CharTokenizer(CHARS), {})
    return path, model


def built_the_old_way(path):
    """A model as load_checkpoint built one before: randomly initialised, then the file's tensors copied over."""
    tensors, meta = read_safetensors(path)
    model = build_model(meta["model_type"], meta["config"])
    load_model_tensors(model, tensors, path)
    return model.eval()


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_loaded_model_gives_the_logits_of_one_built_the_old_way(tmp_path, kind):
    path, _ = saved(tmp_path, kind)
    loaded, old = load_checkpoint(path)[0], built_the_old_way(path)
    x = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], old(x)[0])
    assert count(loaded) == count(old)


def test_loaded_gpt_keeps_its_output_matrix_tied_to_its_embedding(tmp_path):
    model = load_checkpoint(saved(tmp_path, "gpt")[0])[0]
    assert model.lm_head.weight is model.tok_emb.weight
    assert "lm_head.weight" not in dict(model.named_parameters())  # one matrix, listed once


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_loaded_model_has_every_tensor_on_the_cpu_none_left_on_the_meta_device(tmp_path, kind):
    model = load_checkpoint(saved(tmp_path, kind)[0])[0]
    assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"cpu"}
    assert all(p.requires_grad for p in model.parameters())  # as a constructed model's: it can be fine-tuned
    assert not model.training


def test_loaded_model_takes_its_own_dtype_whatever_the_file_stores(tmp_path):
    path, model = saved(tmp_path, "gpt")
    tensors, meta = read_safetensors(path)
    write_safetensors(tmp_path / "half.safetensors", {k: v.bfloat16() for k, v in tensors.items()}, meta)
    loaded = load_checkpoint(tmp_path / "half.safetensors")[0]
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert torch.equal(loaded.tok_emb.weight, model.tok_emb.weight.bfloat16().float())


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_described_model_has_the_config_and_parameter_count_but_no_storage(tmp_path, kind):
    path, model = saved(tmp_path, kind)
    described, tokenizer, meta = describe_checkpoint(path)
    assert type(described) is type(model) and described.config == model.config
    assert count(described) == count(model)
    assert {p.device.type for p in described.parameters()} == {"meta"}
    assert tokenizer.vocab_size == 40 and meta["model_type"] == kind
    assert next(described.to(torch.bfloat16).parameters()).dtype == torch.bfloat16  # what the model card reports


def header_meta(model):
    return {
        "model_type": "gpt",
        "config": dataclasses.asdict(model.config),
        "tokenizer": CharTokenizer(CHARS).to_dict(),
    }


def test_described_checkpoint_whose_shapes_disagree_with_the_config_is_refused(tmp_path):
    big = tiny_gpt(hidden_size=64)
    tensors = {k: v for k, v in big.state_dict().items() if k != "lm_head.weight"}
    write_safetensors(tmp_path / "m.safetensors", tensors, header_meta(tiny_gpt()))
    with pytest.raises(CheckpointError, match="weights do not match the config") as refused:
        describe_checkpoint(tmp_path / "m.safetensors")
    assert "size mismatch for tok_emb.weight" in str(refused.value)


def test_described_checkpoint_missing_a_tensor_or_with_one_too_many_is_refused(tmp_path):
    small = tiny_gpt()
    tensors = {k: v for k, v in small.state_dict().items() if k not in ("lm_head.weight", "ln_f.bias")}
    write_safetensors(tmp_path / "m.safetensors", {**tensors, "extra": torch.zeros(1)}, header_meta(small))
    with pytest.raises(CheckpointError, match=r"missing \['ln_f.bias'\], unexpected \['extra'\]"):
        describe_checkpoint(tmp_path / "m.safetensors")


def test_described_checkpoint_cut_short_is_refused_though_no_tensor_is_read(tmp_path):
    path, _ = saved(tmp_path, "gpt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 4])
    with pytest.raises(CheckpointError, match="corrupted"):
        describe_checkpoint(path)


# Loads a checkpoint in a fresh process and prints the weights' MiB and how much the process's peak resident memory
# grew while loading: the high-water mark is reset first (/proc/self/clear_refs), so that torch's import is not in it.
PEAK = """
import json, sys, torch
from model import load_checkpoint
def status(key):
    return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
model = load_checkpoint(sys.argv[1])[0]
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(json.dumps({"weights": weights, "peak": status("VmHWM") - before}))
"""


def write_large_gpt(path):
    """A GPT of about 100 MB of float32 weights, made and saved by a subprocess (this process stays as small)."""
    make = (
        "import sys, torch; from model import GPT, ByteTokenizer, save_checkpoint; torch.manual_seed(0); "
        "save_checkpoint(sys.argv[1], GPT(256, 64, 512, 8, 8, 0.0), ByteTokenizer(), {})"
    )
    subprocess.run([sys.executable, "-c", make, str(path)], cwd=REPO, env=trainer_env(), check=True, timeout=300)


@pytest.mark.slow
def test_loading_a_large_checkpoint_peaks_near_one_copy_of_its_weights_not_two(tmp_path):
    write_large_gpt(tmp_path / "large.safetensors")
    out = subprocess.run(
        [sys.executable, "-c", PEAK, str(tmp_path / "large.safetensors")],
        cwd=REPO,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout)
    assert 90 < seen["weights"] < 110
    # a model built randomly and then overwritten peaked at twice the weights (measured: 199 MiB for 97)
    assert seen["peak"] < 1.5 * seen["weights"], seen
