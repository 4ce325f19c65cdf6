"""The trainer: its schedule, its settings, its errors, and real runs (single process, resumed, DDP)."""

import hashlib
import json
import math
import signal
import subprocess
import time

import httpx
import pytest
import torch
from helpers import REPO, SHAKESPEARE, TINY_TRAIN_ARGS, read_log, run_trainer, trainer_command, trainer_env

from model import GPT, LSTM, CharTokenizer, load_checkpoint
from model.checkpoint import read_safetensors
from train import data as data_module
from train import loop as loop_module
from train.config import PRESETS, parse_config
from train.loop import get_lr, train


def config(corpus, out, *extra):
    return parse_config(["--data", str(corpus), "--out", str(out), *TINY_TRAIN_ARGS, *map(str, extra)])


def final_state(run_dir):
    """Tensors of the resume file: the weights, optimizer moments and RNG states at the end of a run."""
    return read_safetensors(run_dir / "resume.safetensors")


# get_lr

SCHEDULE = parse_config(
    [
        "--data",
        "x",
        "--out",
        "y",
        "--learning-rate",
        "1e-3",
        "--min-lr",
        "1e-4",
        "--warmup-iters",
        "10",
        "--max-iters",
        "110",
    ]
)


def test_get_lr_warms_up_linearly_to_the_peak():
    warmup = [get_lr(it, SCHEDULE) for it in range(11)]
    assert 0 < warmup[0] < warmup[5] < warmup[10]
    steps = [b - a for a, b in zip(warmup, warmup[1:])]
    assert max(steps) - min(steps) < 1e-12  # linear
    assert warmup[10] == pytest.approx(1e-3)


def test_get_lr_decays_by_cosine_from_peak_to_min_lr():
    assert get_lr(60, SCHEDULE) == pytest.approx((1e-3 + 1e-4) / 2)  # halfway down the cosine
    assert get_lr(35, SCHEDULE) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4)
    decay = [get_lr(it, SCHEDULE) for it in range(10, 111)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_get_lr_at_and_after_max_iters_is_min_lr():
    assert get_lr(110, SCHEDULE) == pytest.approx(1e-4)
    assert get_lr(500, SCHEDULE) == 1e-4


# settings


def test_preset_cpu_is_nanogpts_cpu_recipe():
    cfg = parse_config(["--data", "x", "--out", "y", "--preset", "cpu"])
    assert (cfg.n_layer, cfg.n_head, cfg.hidden_size, cfg.context_size, cfg.batch_size) == (4, 4, 128, 64, 12)
    assert (cfg.max_iters, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters) == (2000, 1e-3, 1e-4, 100)
    assert (cfg.beta2, cfg.dropout) == (0.99, 0.0)


def test_preset_gpu_is_nanogpts_baby_gpt_recipe():
    cfg = parse_config(["--data", "x", "--out", "y", "--preset", "gpu"])
    assert (cfg.n_layer, cfg.n_head, cfg.hidden_size, cfg.context_size, cfg.batch_size) == (6, 6, 384, 256, 64)
    assert (cfg.max_iters, cfg.dropout) == (5000, 0.2)


def test_explicit_options_win_over_a_preset():
    cfg = parse_config(["--data", "x", "--out", "y", "--preset", "cpu", "--max-iters", "7", "--dropout", "0.1"])
    assert cfg.max_iters == 7 and cfg.dropout == 0.1
    assert cfg.n_layer == PRESETS["cpu"]["n_layer"]


def test_config_with_hidden_size_not_divisible_by_heads_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--data", "x", "--out", "y", "--hidden-size", "30", "--n-head", "4"])
    assert "divisible" in capsys.readouterr().err


# the corpus


def test_trainer_when_data_is_not_utf8_says_so_and_how_to_convert_it(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait\n".encode("latin-1") * 200)
    with pytest.raises(SystemExit, match="not UTF-8") as e:
        train(config(bad, tmp_path / "run", "--max-iters", 1))
    converted = tmp_path / "latin1-utf8.txt"
    assert f"iconv -f latin1 -t utf-8 {bad} > {converted}, and use {converted} in its place" in str(e.value)


@pytest.mark.parametrize("under", [False, True])
def test_trainer_with_out_naming_a_file_says_out_must_be_a_directory(corpus, tmp_path, under):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    out = file / "run" if under else file
    where = f"is inside {file}, a file" if under else "is a file"
    with pytest.raises(SystemExit, match=f"--out {out} {where}: --out must be a directory"):
        train(config(corpus, out, "--max-iters", 1))
    assert file.read_text() == "mine"


def test_trainer_when_data_is_missing_says_so(tmp_path):
    with pytest.raises(SystemExit, match="cannot read --data"):
        train(config(tmp_path / "nope.txt", tmp_path / "run", "--max-iters", 1))


def test_trainer_given_a_folder_that_is_not_prepared_says_how_to_prepare_it(tmp_path):
    (tmp_path / "books").mkdir()
    with pytest.raises(SystemExit, match=r"is a folder that python -m train.prepare did not make: prepare it first"):
        train(config(tmp_path / "books", tmp_path / "run", "--max-iters", 1))


@pytest.mark.parametrize("problem", ["missing", "not utf-8", "too small"])
def test_trainer_that_fails_to_start_leaves_no_run_folder(tmp_path, problem):
    data = tmp_path / "data.txt"
    if problem == "not utf-8":
        data.write_bytes(b"\xff\xfe" * 2000)
    elif problem == "too small":
        data.write_text("tiny" * 20)
    with pytest.raises(SystemExit):
        train(config(data, tmp_path / "runs" / "new", "--max-iters", 1))
    assert not (tmp_path / "runs").exists()


def test_trainer_from_the_command_line_with_missing_data_exits_non_zero_and_leaves_no_folder(tmp_path):
    proc = subprocess.run(
        trainer_command("--data", "/nonexistent", "--out", tmp_path / "run", "--max-iters", 1),
        cwd=REPO,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "cannot read --data /nonexistent" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_trainer_failing_before_its_first_checkpoint_removes_only_a_folder_it_created(corpus, tmp_path, monkeypatch):
    def broken_eval(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(loop_module, "estimate_loss", broken_eval)
    with pytest.raises(RuntimeError):
        train(config(corpus, tmp_path / "new", "--max-iters", 2))
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    with pytest.raises(RuntimeError):
        train(config(corpus, mine, "--max-iters", 2))
    assert (mine / "notes").is_dir()  # a folder the user made is theirs: only the trainer's files may change


def test_trainer_when_corpus_is_too_small_for_the_context_says_so(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("tiny" * 20)
    with pytest.raises(SystemExit, match="too small"):
        train(config(small, tmp_path / "run", "--max-iters", 1))


def test_split_validates_on_the_last_tenth_of_the_bytes():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    train_text, val_text = data_module.split_text(text)
    assert train_text == text[:900] and val_text == text[900:]


def test_split_moves_forward_to_the_start_of_a_character():
    text = "a" * 899 + "é" + "b" * 100  # byte 900 is the second byte of é
    train_text, val_text = data_module.split_text(text)
    assert train_text == "a" * 899 + "é" and val_text == "b" * 100


def test_encode_splits_gives_the_ids_of_each_split():
    text = "abcdefghij" * 100
    tok = CharTokenizer.from_text(text)
    train_ids, val_ids = data_module.encode_splits(tok, text, context_size=16)
    assert tok.decode(train_ids.tolist()) == text[:900] and tok.decode(val_ids.tolist()) == text[900:]


def test_shakespeare_download_when_offline_asks_for_a_local_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise httpx.ConnectError("no network")

    monkeypatch.setattr(httpx, "get", offline)
    with pytest.raises(SystemExit, match="--data PATH"):
        data_module.download_shakespeare(cache_dir=tmp_path)


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="shared/data/tinyshakespeare.txt is not here")
def test_shakespeare_copy_in_shared_data_is_the_char_rnn_input_txt():
    text, sha = data_module.read_corpus(str(SHAKESPEARE))
    assert sha == data_module.SHAKESPEARE_SHA256
    assert CharTokenizer.from_text(text).vocab_size == 65


# runs


@pytest.mark.slow
def test_trainer_run_writes_a_loadable_checkpoint_a_log_and_a_plot(corpus, tmp_path):
    out = tmp_path / "run"
    run_trainer("--data", corpus, "--out", out, *TINY_TRAIN_ARGS, "--max-iters", 30, "--eval-interval", 15)
    model, tok, meta = load_checkpoint(out)
    assert isinstance(model, GPT) and not model.training
    assert meta["corpus_sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert meta["iter"] in (0, 15, 30) and meta["tokens_seen"] == meta["iter"] * 4 * 16
    assert meta["train_config"]["max_iters"] == 30 and meta["code_version"]
    text = tok.decode(model.generate(torch.tensor([tok.encode("T")]), 20)[0].tolist())
    assert len(text) == 21 and text[0] == "T"

    log = read_log(out)
    assert [r["iter"] for r in log if r["kind"] == "eval"] == [0, 15, 30]
    assert [r["iter"] for r in log if r["kind"] == "train"] == list(range(30))
    assert all({"loss", "lr", "tokens_per_s"} <= r.keys() for r in log if r["kind"] == "train")
    evals = [r for r in log if r["kind"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # it learned something
    assert meta["best_val_loss"] == min(r["val_loss"] for r in evals)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trainer_trains_the_lstm(corpus, tmp_path):
    out = tmp_path / "run"
    best = train(
        config(
            corpus,
            out,
            "--model",
            "lstm",
            "--tokenizer",
            "byte",
            "--max-iters",
            30,
            "--eval-interval",
            10,
            "--learning-rate",
            "1e-2",
            "--min-lr",
            "1e-3",
        )
    )
    model, _, meta = load_checkpoint(out)
    assert isinstance(model, LSTM) and meta["model_type"] == "lstm"
    assert meta["tokenizer"] == {"kind": "byte"}
    evals = [r for r in read_log(out) if r["kind"] == "eval"]
    assert best == meta["best_val_loss"] < evals[0]["val_loss"]


def test_trainer_accumulating_two_micro_batches_equals_one_double_batch(corpus, tmp_path):
    common = ["--max-iters", 3, "--eval-interval", 100]
    train(config(corpus, tmp_path / "double", *common, "--batch-size", 8))
    train(config(corpus, tmp_path / "accum", *common, "--batch-size", 4, "--gradient-accumulation-steps", 2))
    (double, double_meta), (accum, accum_meta) = final_state(tmp_path / "double"), final_state(tmp_path / "accum")
    assert accum_meta["tokens_seen"] == double_meta["tokens_seen"] == 3 * 8 * 16
    for name in double:
        if name.startswith("model."):
            torch.testing.assert_close(accum[name], double[name], rtol=0, atol=1e-5)


def test_trainer_refuses_to_overwrite_a_run_without_resume_or_overwrite(corpus, tmp_path):
    out = tmp_path / "run"
    train(config(corpus, out, "--max-iters", 2, "--eval-interval", 100))
    with pytest.raises(SystemExit, match="--resume.*--overwrite"):
        train(config(corpus, out, "--max-iters", 2))
    train(config(corpus, out, "--max-iters", 2, "--overwrite"))  # the explicit way out


def test_trainer_resume_without_a_run_says_so(corpus, tmp_path):
    with pytest.raises(SystemExit, match="cannot resume"):
        train(config(corpus, tmp_path / "empty", "--max-iters", 2, "--resume"))
    assert not (tmp_path / "empty").exists()


def bundled_like_folder(corpus, out):
    """A folder like checkpoints/shakespeare-gpt: a trained model.safetensors, and no resume state."""
    train(config(corpus, out, "--max-iters", 2, "--eval-interval", 100))
    (out / "resume.safetensors").unlink()
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_trainer_refuses_an_out_folder_holding_a_model_and_writes_nothing(corpus, tmp_path):
    out = tmp_path / "shakespeare-gpt"
    before = bundled_like_folder(corpus, out)
    proc = subprocess.run(
        trainer_command("--data", corpus, "--out", out, *TINY_TRAIN_ARGS, "--max-iters", 10),
        cwd=REPO,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(out) in lines[0] and "--resume" in lines[0] and "--overwrite" in lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # byte for byte, and no new file


def test_trainer_with_overwrite_replaces_a_model_folder(corpus, tmp_path):
    out = tmp_path / "shakespeare-gpt"
    before = bundled_like_folder(corpus, out)
    train(config(corpus, out, "--max-iters", 4, "--eval-interval", 2, "--overwrite"))
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert load_checkpoint(out)[2]["train_config"]["max_iters"] == 4


# threads


def test_trainer_threads_option_sets_torchs_intra_op_threads(corpus, tmp_path):
    before = torch.get_num_threads()
    try:
        train(config(corpus, tmp_path / "run", "--max-iters", 1, "--threads", 2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert load_checkpoint(tmp_path / "run")[2]["train_config"]["threads"] == 2


def test_trainer_threads_default_leaves_torchs_choice(corpus, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    train(config(corpus, tmp_path / "run", "--max-iters", 1))
    assert calls == []


def test_trainer_threads_below_one_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--data", "x", "--out", "y", "--threads", "0"])
    assert "--threads must be >= 1" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_trainer_on_a_device_this_machine_lacks_says_so_and_writes_nothing(corpus, tmp_path):
    with pytest.raises(SystemExit, match="cannot train: device 'cuda'"):
        train(config(corpus, tmp_path / "run", "--device", "cuda"))
    assert not (tmp_path / "run").exists()


def test_trainer_resume_on_another_corpus_is_refused(corpus, tmp_path):
    out = tmp_path / "run"
    train(config(corpus, out, "--max-iters", 2))
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text().upper())
    with pytest.raises(SystemExit, match="not the corpus"):
        train(config(other, out, "--max-iters", 4, "--resume"))


def log_rows(run_dir):
    """What a log says, without the wall-clock fields that differ between runs."""
    return [(r["kind"], r["iter"], r["tokens"], r.get("loss"), r.get("val_loss")) for r in read_log(run_dir)]


def logged_train_steps(run_dir):
    """Iterations of the train rows logged so far, read while the trainer may be writing."""
    try:
        lines = (run_dir / "log.jsonl").read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return []
    return [json.loads(line)["iter"] for line in lines if line.endswith("\n") and '"train"' in line]


def kill_after_logged_step(cmd, out, step, timeout=60):
    """Start the trainer and SIGKILL it mid-training, as soon as its log shows train step `step`."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=trainer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if step in logged_train_steps(out):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{err.decode()[-3000:]}"
    return read_safetensors(out / "resume.safetensors")[1]["iter"]


@pytest.mark.slow
def test_trainer_killed_mid_run_and_resumed_ends_with_the_same_weights(corpus, tmp_path):
    args = ["--data", corpus, *TINY_TRAIN_ARGS, "--max-iters", 60, "--eval-interval", 20, "--dropout", 0.1]
    run_trainer(*args, "--out", tmp_path / "whole")
    killed = tmp_path / "killed"
    k = kill_after_logged_step(trainer_command(*args, "--out", killed), killed, step=25)
    assert 20 <= k < 60 and max(logged_train_steps(killed)) > k  # steps past the resume state are lost
    run_trainer(*args, "--out", killed, "--resume")

    (whole, whole_meta), (resumed, resumed_meta) = final_state(tmp_path / "whole"), final_state(killed)
    assert resumed.keys() == whole.keys()
    for name in whole:  # weights, optimizer moments and RNG states, bit for bit
        assert torch.equal(resumed[name], whole[name]), name
    assert (resumed_meta["iter"], resumed_meta["tokens_seen"]) == (whole_meta["iter"], whole_meta["tokens_seen"])
    best_whole = read_safetensors(tmp_path / "whole" / "model.safetensors")[0]
    best_resumed = read_safetensors(killed / "model.safetensors")[0]
    assert all(torch.equal(best_resumed[n], best_whole[n]) for n in best_whole)
    # the log reads as one run: nothing the killed run logged after its resume state is repeated
    assert log_rows(killed) == log_rows(tmp_path / "whole")


@pytest.mark.slow
def test_trainer_under_torchrun_with_two_gloo_processes_writes_a_loadable_checkpoint(corpus, tmp_path):
    out = tmp_path / "ddp"
    proc = run_trainer(
        "--data",
        corpus,
        "--out",
        out,
        *TINY_TRAIN_ARGS,
        "--max-iters",
        6,
        "--eval-interval",
        3,
        "--gradient-accumulation-steps",
        2,
        "--device",
        "cpu",
        nproc=2,
    )
    model, _, meta = load_checkpoint(out)
    assert isinstance(model, GPT)
    assert meta["world_size"] == 2
    assert final_state(out)[1]["tokens_seen"] == 6 * 4 * 16 * 2 * 2  # iters x batch x context x accum x ranks
    assert [r["iter"] for r in read_log(out) if r["kind"] == "eval"] == [0, 3, 6]  # rank 0 alone logs
    assert "world 2" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_trainer_interrupted_by_ctrl_c_says_where_its_last_checkpoint_is(corpus, tmp_path):
    out, err = tmp_path / "run", tmp_path / "trainer.err"
    cmd = trainer_command("--data", corpus, "--out", out, *TINY_TRAIN_ARGS, "--max-iters", 10**6, "--eval-interval", 5)
    with open(err, "wb") as f:  # a file, not a pipe: a full pipe would stall the trainer
        # SIGINT back to its default, in case this test runs where it is ignored (a background job)
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=trainer_env(),
            stdout=subprocess.DEVNULL,
            stderr=f,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    deadline = time.monotonic() + 120
    try:  # signal once a checkpoint exists and training has gone on past it
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "resume.safetensors").exists() and any(s > 5 for s in logged_train_steps(out)):
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    stderr = err.read_text()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    saved = read_safetensors(out / "resume.safetensors")[1]["iter"]
    assert last.startswith("python -m train: interrupted at iteration ")
    assert f"the last checkpoint is in {out} (iteration {saved})" in last and "--resume" in last
    assert [line for line in stderr.splitlines() if "interrupted" in line] == [last]  # one line


def test_ctrl_c_while_the_trainer_starts_up_is_one_line_and_leaves_no_run(corpus, tmp_path):
    out = tmp_path / "run"
    cmd = trainer_command("--data", corpus, "--out", out, *TINY_TRAIN_ARGS)
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=trainer_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # in case a background job ignores it
    )
    time.sleep(0.3)  # torch takes longer than this to import
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "python -m train: interrupted before training started; --out is as it was"
    assert not (out / "model.safetensors").exists()
