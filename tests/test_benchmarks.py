"""Each benchmark script runs in its --quick mode and writes its results (timings are not checked)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def run_quick(name, tmp_path, *args):
    out = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "QUILL_BENCH_DOCS": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads((tmp_path / f"bench-{name}-quick.json").read_text())


@pytest.mark.slow
def test_decode_benchmark_quick_mode_reports_engine_reference_and_floor(tmp_path):
    rows = run_quick("decode", tmp_path)["results"]
    assert rows and all(r["engine_tok_s"] > 0 and r["generate_tok_s"] > 0 and r["floor_ms_per_token"] > 0 for r in rows)


@pytest.mark.slow
@pytest.mark.server
def test_http_benchmark_quick_mode_streams_from_a_real_server(tmp_path):
    result = run_quick("http", tmp_path)["results"]
    assert [r["clients"] for r in result["concurrency"]] == [1, 4]
    assert all(r["aggregate_tok_s"] > 0 for r in result["concurrency"])
    assert result["overhead"]["ratio"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not CORPUS.exists(), reason="Tiny Shakespeare is not at ../shared/data")
def test_train_benchmark_quick_mode_reports_speed_mfu_and_loss(tmp_path):
    result = run_quick("train", tmp_path)["results"]
    assert result["peak_flops"] > 0
    assert len(result["runs"]) == 3 and all(r["mfu"] > 0 and r["val_loss_full"] > 0 for r in result["runs"])


@pytest.mark.slow
@pytest.mark.skipif(not CORPUS.exists(), reason="Tiny Shakespeare is not at ../shared/data")
def test_threads_benchmark_quick_mode_times_both_thread_counts_alone_and_beside_a_busy_process(tmp_path):
    result = run_quick("threads", tmp_path)["results"]
    assert sorted((r["threads"], r["busy_process"]) for r in result["runs"]) == [
        (1, False),
        (1, True),
        (2, False),
        (2, True),
    ]
    assert all(r["tokens_per_s"] > 0 and len(r["samples"]) == result["repeats"] for r in result["runs"])
    assert len(result["load_average_before"]) == 3
    assert "| --threads |" in (tmp_path / "bench-threads-quick.md").read_text()


@pytest.mark.slow
def test_prepared_benchmark_quick_mode_trains_from_memory_and_from_a_prepared_folder(tmp_path):
    result = run_quick("prepared", tmp_path)["results"]
    assert result["corpus_mb"] == 12 and result["corpus_tokens"] > 0
    for name in ("memory", "prepared"):
        assert len(result[f"{name}_tokens_per_s"]) == 1 and result[f"{name}_tokens_per_s"][0] > 0
        assert result[f"{name}_peak_mb"][0] > 0
        assert result["in_process_tokens_per_s"][name] > 0  # the data path alone, both sources in one process


def test_gpt2_small_shape_is_gpt2_configs_default():
    from transformers import GPT2Config

    from benchmarks.peer_models import GPT2_SHAPE

    config = GPT2Config()
    assert {key: getattr(config, key) for key in GPT2_SHAPE} == GPT2_SHAPE
    assert config.activation_function == "gelu_new"  # the tanh GELU, which the import maps to gelu="tanh"


def test_gpt2_small_tokenizer_refuses_a_corpus_too_small_for_its_vocabulary():
    from benchmarks.peer_models import train_tokenizer

    with pytest.raises(SystemExit, match="only"):
        train_tokenizer(5000, ["a tiny corpus"])


@pytest.mark.slow
def test_gpt2_small_from_quill_gpt2_dir_imports_a_random_gpt2_once_with_its_shape_and_tokenizer(tmp_path, monkeypatch):
    from benchmarks.peer_models import GPT2_ENV, gpt2_small, write_random_hf
    from model import load_checkpoint

    shape = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64, "vocab_size": 300}
    write_random_hf(tmp_path / "hf", shape, texts=[(ROOT / "benchmarks" / "peers.py").read_text()])
    monkeypatch.setenv(GPT2_ENV, str(tmp_path / "hf"))
    run = gpt2_small(tmp_path / "work")
    model, tokenizer, meta = load_checkpoint(run)
    config = model.config
    assert (config.n_layer, config.n_head, config.hidden_size, config.context_size) == (2, 2, 32, 64)
    assert (config.vocab_size, tokenizer.vocab_size, config.gelu) == (300, 300, "tanh")
    assert tokenizer.decode([299]) == "<|endoftext|>"  # GPT-2's end token, last, as in GPT-2
    assert meta["imported_from"]["path"] == str((tmp_path / "hf").resolve())
    imported = (run / "model.safetensors").stat().st_mtime_ns
    assert gpt2_small(tmp_path / "work") == run and (run / "model.safetensors").stat().st_mtime_ns == imported


def test_gpt2_small_refuses_a_quill_gpt2_dir_without_weights(tmp_path, monkeypatch):
    from benchmarks.peer_models import GPT2_ENV, gpt2_small

    monkeypatch.setenv(GPT2_ENV, str(tmp_path))
    with pytest.raises(SystemExit, match=f"{GPT2_ENV}=.*no model.safetensors"):
        gpt2_small(tmp_path / "work")
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
def test_constrained_benchmark_quick_mode_times_every_format_at_1_and_32_streams(tmp_path, checkpoints):
    values = run_quick("constrained", tmp_path, "--eager", "--model", str(checkpoints["byte-gpt"]))["values"]
    formats = ["none", "regex [a-z ,.]+", "JSON schema, one string"]
    assert sorted(values) == sorted(f"{n}|{f}" for n in (1, 32) for f in formats)
    assert all(tok_s > 0 and made > 0 for runs in values.values() for tok_s, made, _ in runs)
    assert "| 32 | JSON schema, one string |" in (tmp_path / "bench-constrained-quick.md").read_text()
