"""Checkpoints: safetensors only, never unpickled, clear errors, and atomic under SIGKILL."""

import dataclasses
import json
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers import REPO, tiny_gpt, tiny_lstm, trainer_env
from safetensors.torch import save_file

from model import ByteTokenizer, CharTokenizer, CheckpointError, load_checkpoint, save_checkpoint
from model.checkpoint import (
    TMP_PREFIX,
    default_checkpoints,
    remove_stale_temp_files,
    resolve_checkpoint_path,
    write_safetensors,
)

CHARS = "abcdefghijklmnopqrstuvwxyz .,;:!?'\n-ABCD"  # 40 characters, to match the tiny configs


def tiny(kind):
    torch.manual_seed(0)
    return tiny_gpt() if kind == "gpt" else tiny_lstm()


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
@pytest.mark.parametrize("as_dir", [True, False])
def test_checkpoint_round_trip_restores_weights_tokenizer_and_metadata(tmp_path, kind, as_dir):
    model, tok = tiny(kind), CharTokenizer(CHARS)
    save_checkpoint(tmp_path / "model.safetensors", model, tok, {"iter": 7, "best_val_loss": 1.5})
    loaded, loaded_tok, meta = load_checkpoint(tmp_path if as_dir else tmp_path / "model.safetensors")
    assert type(loaded) is type(model)
    assert_same_weights(model, loaded)
    assert loaded_tok.chars == tok.chars
    assert meta["iter"] == 7 and meta["best_val_loss"] == 1.5
    assert meta["model_type"] == kind and meta["config"] == dataclasses.asdict(model.config)


def test_checkpoint_loads_the_model_in_eval_mode_with_identical_logits(tmp_path):
    model = tiny_gpt(256, dropout=0.2).eval()
    save_checkpoint(tmp_path / "m.safetensors", model.train(), ByteTokenizer(), {})
    loaded, tok, _ = load_checkpoint(tmp_path / "m.safetensors")
    assert not loaded.training
    assert isinstance(tok, ByteTokenizer)
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(loaded(x)[0], model.eval()(x)[0])


def test_checkpoint_of_gpt_stores_the_tied_matrix_once_and_loads_it_tied(tmp_path):
    save_checkpoint(tmp_path / "m.safetensors", tiny("gpt"), CharTokenizer(CHARS), {})
    header_len = struct.unpack("<Q", (tmp_path / "m.safetensors").read_bytes()[:8])[0]
    header = json.loads((tmp_path / "m.safetensors").read_bytes()[8 : 8 + header_len])
    assert "tok_emb.weight" in header and "lm_head.weight" not in header
    loaded, _, _ = load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.lm_head.weight is loaded.tok_emb.weight


def test_checkpoint_whose_header_length_starts_with_the_pickle_opcode_byte_still_loads(tmp_path):
    # The header length is little-endian, so a length of 128 + 256k begins with 0x80 like a pickle.
    path, model = tmp_path / "m.safetensors", tiny("gpt")
    for n in range(400):
        save_checkpoint(path, model, CharTokenizer(CHARS), {"pad": "x" * n})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert_same_weights(load_checkpoint(path)[0], model)


def test_checkpoint_when_path_is_missing_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path)


class WritesMarker:
    """A pickle payload that, if ever unpickled, creates a file: the proof that loading ran it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL])
def test_checkpoint_refuses_a_raw_pickle_without_unpickling_it(tmp_path, protocol):
    marker, path = tmp_path / "pwned", tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"weights": WritesMarker(marker)}, protocol=protocol))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_checkpoint_refuses_a_torch_save_file_posing_as_safetensors(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "model.safetensors"
    torch.save({"state": tiny("gpt").state_dict(), "x": WritesMarker(marker)}, path)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_checkpoint_refuses_a_pickle_suffix_before_reading_it(tmp_path, suffix):
    marker, path = tmp_path / "pwned", tmp_path / f"model{suffix}"
    torch.save({"x": WritesMarker(marker)}, path)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_when_truncated_raises_a_clear_error(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny("gpt"), CharTokenizer(CHARS), {})
    data = path.read_bytes()
    for cut in (len(data) // 2, 100, 4):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated|corrupted"):
            load_checkpoint(path)


def test_checkpoint_when_header_claims_a_huge_size_raises_without_allocating_it(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 60) + b'{"__metadata__": {}}')
    with pytest.raises(CheckpointError, match="header claims"):
        load_checkpoint(path)


def test_checkpoint_when_data_is_corrupted_raises_a_clear_error(tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny("gpt"), CharTokenizer(CHARS), {})
    data = bytearray(path.read_bytes())
    data[8:20] = b"garbage!!!!!"  # the JSON header no longer parses
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_checkpoint_without_quill_metadata_is_refused(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a Quill checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")


def test_checkpoint_whose_tokenizer_disagrees_with_the_model_is_refused(tmp_path):
    save_checkpoint(tmp_path / "m.safetensors", tiny("gpt"), ByteTokenizer(), {})  # 256 tokens vs 40
    with pytest.raises(CheckpointError, match="tokenizer has 256 tokens"):
        load_checkpoint(tmp_path / "m.safetensors")


def test_checkpoint_whose_weights_disagree_with_the_config_is_refused(tmp_path):
    small, big = tiny("gpt"), tiny_gpt(hidden_size=64)
    meta = {
        "model_type": "gpt",
        "config": dataclasses.asdict(small.config),
        "tokenizer": CharTokenizer(CHARS).to_dict(),
    }
    write_safetensors(
        tmp_path / "m.safetensors", {k: v for k, v in big.state_dict().items() if k != "lm_head.weight"}, meta
    )
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path / "m.safetensors")


def test_checkpoint_path_of_a_run_directory_is_its_weights_file_and_a_file_is_itself(tmp_path):
    assert resolve_checkpoint_path(tmp_path) == tmp_path / "model.safetensors"
    assert resolve_checkpoint_path(tmp_path / "x.safetensors") == tmp_path / "x.safetensors"


def test_default_checkpoints_are_the_bundled_gpt_then_every_other_run_by_name_whatever_a_user_trained(tmp_path):
    runs = ("a-lstm", "pystd-gpt", "shakespeare-gpt", "shakespeare-lstm")  # pystd-gpt: a user's run
    for run in (*runs, "empty"):
        (tmp_path / run).mkdir()
    for run in runs:
        save_checkpoint(tmp_path / run / "model.safetensors", tiny("lstm"), CharTokenizer(CHARS), {})
    order = ["shakespeare-gpt", "a-lstm", "pystd-gpt", "shakespeare-lstm"]
    assert default_checkpoints(tmp_path) == [tmp_path / run for run in order]


def test_default_checkpoints_without_a_root_are_those_in_checkpoints_the_bundled_gpt_first():
    names = [p.name for p in default_checkpoints()]  # and whatever a user trained into checkpoints/ after them
    assert names[0] == "shakespeare-gpt" and "shakespeare-lstm" in names


def test_checkpoint_save_leaves_no_temporary_file_behind(tmp_path):
    save_checkpoint(tmp_path / "model.safetensors", tiny("lstm"), CharTokenizer(CHARS), {})
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644


# The saver imports torch once, then forks one child per round that saves two models
# alternately, forever; the test SIGKILLs each child at a random moment.
SAVER = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)
    from model import GPT, CharTokenizer, save_checkpoint
    path, ref_dir = sys.argv[1], sys.argv[2]
    tok = CharTokenizer(sys.argv[3])
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)  # big enough that a save takes a few milliseconds
        models.append(GPT(vocab_size=40, context_size=64, hidden_size=128, n_layer=2, n_head=4, dropout=0.0))
    for i, m in enumerate(models):
        save_checkpoint(f"{ref_dir}/{i}.safetensors", m, tok, {"which": i})
    save_checkpoint(path, models[0], tok, {"which": 0})
    for _ in sys.stdin:
        pid = os.fork()
        if pid == 0:
            for i in range(1, 10**9):
                save_checkpoint(path, models[i % 2], tok, {"which": i % 2})
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)
""")


@pytest.mark.slow
def test_checkpoint_killed_mid_save_leaves_the_previous_or_the_new_file_whole(tmp_path):
    run_dir, ref_dir = tmp_path / "run", tmp_path / "refs"
    run_dir.mkdir(), ref_dir.mkdir()
    path = run_dir / "model.safetensors"
    saver = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(path), str(ref_dir), CHARS],
        cwd=REPO,
        env=trainer_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    rng, seen = random.Random(0), []
    try:
        for _ in range(50):  # at least 50 kills at random moments
            saver.stdin.write("go\n")
            saver.stdin.flush()
            pid = int(saver.stdout.readline())
            time.sleep(rng.uniform(0.002, 0.05))
            os.kill(pid, signal.SIGKILL)
            assert saver.stdout.readline() == "reaped\n"  # dead, so the file can no longer change
            model, _, meta = load_checkpoint(path)  # must be whole, whatever the moment
            reference, _, _ = load_checkpoint(ref_dir / f"{meta['which']}.safetensors")
            assert_same_weights(model, reference)
            seen.append(meta["which"])
    finally:
        saver.kill()
        saver.wait()
    assert set(seen) == {0, 1}  # the kills landed while both models were being written
    leftovers = set(os.listdir(run_dir)) - {"model.safetensors"}
    assert all(name.startswith(TMP_PREFIX) for name in leftovers)
    remove_stale_temp_files(run_dir)
    assert os.listdir(run_dir) == ["model.safetensors"]
