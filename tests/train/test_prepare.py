"""python -m train.prepare: a corpus tokenized once, in chunks and worker processes, into token files that
hold exactly the ids of the corpus tokenized whole in memory, and that the trainer trains from alike."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO, TINY_TRAIN_ARGS, run_trainer, trainer_env

import train.prepare as prepare_module
from model import load_checkpoint
from model.checkpoint import read_safetensors
from train.config import parse_config
from train.data import TokenFile, encode_text, get_batch, load_prepared, make_tokenizer
from train.loop import train
from train.prepare import token_dtype

# Whitespace that a careless cut would tokenize differently: blank-line runs, trailing spaces, tabs, CRLF.
PIECES = [
    "To be, or not to be: that is the question.",
    "  trailing spaces  ",
    "\ttabbed\tline\t",
    "",
    "",
    "Zoë said «déjà vu» ⚡ naïvely",
    "emoji 🦊🎉 mid-line, 🦊 again",
    "   ",
    "a CRLF line\r",
    "x\n\n\n",
    "numbers 123 4.5e6 and it's—they'll",
    " \t \n",
    "最后一行。",
]
BLOCK = 256  # bytes per read: the test corpora become dozens of chunks
TINY = ["--n-layer", "1", "--n-head", "2", "--hidden-size", "16", "--context-size", "16", "--batch-size", "4"]
RUN = ["--eval-iters", "2", "--log-interval", "1", "--warmup-iters", "2", "--eval-interval", "2"]


@pytest.fixture(params=["\n", "\r\n"], ids=["lf", "crlf"])
def tricky(request, tmp_path):
    path = tmp_path / "tricky.txt"
    text = "\n".join(PIECES[(i * 5) % len(PIECES)] for i in range(500)) + "\n\n  \n"
    text = text.replace("\n", request.param)
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.fixture
def chunk_log(monkeypatch):
    """Small reads, and the (split, text) chunks that each pass reads."""
    monkeypatch.setattr(prepare_module, "BLOCK_BYTES", BLOCK)
    log, chunks = [], prepare_module.chunks

    def logged(*args, **kwargs):
        for item in chunks(*args, **kwargs):
            log.append(item)
            yield item

    monkeypatch.setattr(prepare_module, "chunks", logged)
    return log


def run_prepare(*args):
    prepare_module.main(list(map(str, args)))


def config(data, out, *extra):
    return parse_config(["--data", str(data), "--out", str(out), *TINY, *RUN, *map(str, extra)])


@pytest.mark.parametrize(("kind", "extra"), [("char", []), ("byte", []), ("bpe", ["--vocab-size", 300])])
def test_prepared_ids_equal_the_text_tokenized_whole_in_memory(kind, extra, tricky, chunk_log, tmp_path):
    run_prepare("--data", tricky, "--out", tmp_path / "data", "--tokenizer", kind, *extra, "--workers", 3)
    raw = tricky.read_bytes()
    text, sha = raw.decode("utf-8"), hashlib.sha256(raw).hexdigest()
    expected = encode_text(make_tokenizer(kind, text, *map(int, extra[1:])), text, sha)
    prepared = load_prepared(tmp_path / "data")
    assert len(chunk_log) > 20  # really chunked, and across worker processes
    assert prepared.tokenizer.to_dict() == expected.tokenizer.to_dict()
    assert prepared.sha256 == sha and prepared.bytes == expected.bytes
    for split in ("train", "val"):
        assert prepared.splits[split][:].tolist() == expected.splits[split].tolist(), split


def test_chunks_end_before_a_newline_after_text_or_at_the_split(tricky, chunk_log, tmp_path):
    run_prepare("--data", tricky, "--out", tmp_path / "data", "--tokenizer", "byte", "--workers", 2)  # no pass 1
    assert "".join(text for _, text in chunk_log) == tricky.read_bytes().decode("utf-8")
    for (split, text), (next_split, following) in zip(chunk_log, chunk_log[1:]):
        if split == next_split:
            assert following[0] in "\r\n" and not text[-1].isspace(), (text[-20:], following[:20])


def test_training_from_a_prepared_folder_equals_training_from_the_file(corpus, tmp_path, chunk_log):
    run_prepare("--data", corpus, "--out", tmp_path / "data", "--tokenizer", "bpe", "--vocab-size", 300)
    for data, out in ((corpus, "from-file"), (tmp_path / "data", "from-folder")):
        train(config(data, tmp_path / out, "--tokenizer", "bpe", "--vocab-size", 300, "--max-iters", 4))
    from_file, file_meta = read_safetensors(tmp_path / "from-file" / "resume.safetensors")
    from_folder, folder_meta = read_safetensors(tmp_path / "from-folder" / "resume.safetensors")
    assert from_file.keys() == from_folder.keys()
    for name, tensor in from_file.items():
        assert torch.equal(from_folder[name], tensor), name
    assert folder_meta["corpus_sha256"] == file_meta["corpus_sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()


def test_a_folder_is_searched_recursively_for_the_glob_in_sorted_order(tmp_path, chunk_log):
    src = tmp_path / "src"
    files = {"b.py": "print('b')\n", "a.py": "x = 1\n" * 40, "sub/c.py": "def f():\n    return 2\n" * 20}
    files |= {"sub/deeper/d.py": "# é ⚡\n" * 30, "notes.txt": "not code\n", "sub/e.md": "# no\n"}
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text, encoding="utf-8")
    run_prepare("--data", src, src / "b.py", "--out", tmp_path / "data", "--glob", "*.py", "--workers", 2)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    order = ["a.py", "b.py", "sub/c.py", "sub/deeper/d.py"]  # b.py, named twice, counts once
    raw = [(src / name).read_bytes() for name in order]
    assert meta["inputs"] == [
        {"path": str(src / name), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in zip(order, raw)
    ]
    assert meta["sha256"] == hashlib.sha256(b"".join(raw)).hexdigest()
    prepared = load_prepared(tmp_path / "data")
    text = "".join(prepared.tokenizer.decode(prepared.splits[s][:].tolist()) for s in ("train", "val"))
    assert text == b"".join(raw).decode("utf-8")
    assert sum(meta["splits"][s]["bytes"] for s in ("train", "val")) == len(b"".join(raw))


def test_token_ids_are_uint16_while_the_vocabulary_fits_and_uint32_beyond():
    assert token_dtype(256) == token_dtype(65536) == "uint16"
    assert token_dtype(65537) == "uint32"


def test_a_vocabulary_of_more_than_65536_characters_is_stored_as_uint32(tmp_path):
    chars = [chr(c) for c in range(0x21, 0x21 + 70000) if not 0xD800 <= c < 0xE000]  # no surrogates
    path = tmp_path / "many.txt"
    path.write_text("".join(chars), encoding="utf-8")
    run_prepare("--data", path, "--out", tmp_path / "data", "--workers", 2)
    prepared = load_prepared(tmp_path / "data")
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["dtype"] == "uint32"
    ids = torch.cat([prepared.splits[s][:] for s in ("train", "val")])
    assert prepared.tokenizer.vocab_size == len(chars) and int(ids.max()) == len(chars) - 1
    assert prepared.tokenizer.decode(ids.tolist()) == "".join(chars)


def write_bad_utf8(tmp_path, offset):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"plain ascii line\n" * (offset // 17) + b"x" * (offset % 17) + "café".encode("latin-1") + b"\n")
    return path, offset + 3  # the byte after "caf"


@pytest.mark.parametrize("kind", ["char", "bpe", "byte"])  # found in pass 1, or in pass 2 after the folder is made
def test_a_file_that_is_not_utf8_is_refused_naming_it_the_byte_and_how_to_convert_it(kind, tmp_path, chunk_log):
    path, bad = write_bad_utf8(tmp_path, 3 * BLOCK + 5)  # past the first blocks: offsets add up across them
    with pytest.raises(SystemExit, match=rf"latin1\.txt is not UTF-8 text \(byte {bad}\).*iconv -f latin1 -t utf-8"):
        run_prepare("--data", path, "--out", tmp_path / "data", "--tokenizer", kind, "--workers", 2)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{tmp}/missing.txt"], r"missing\.txt: no such file or folder"),
        (["--data", "{tmp}/src", "--glob", "*.py"], r"no files match \*\.py; --glob sets the file name patterns"),
        (["--data", "{tmp}/src/sub"], r"no files match \*\.txt \*\.md; --glob sets the file name patterns"),
        (["--data", "{tmp}/src/empty.txt"], "empty"),
    ],
)
def test_bad_inputs_are_refused_naming_them_and_nothing_is_written(args, message, tmp_path):
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "empty.txt").write_text("")
    with pytest.raises(SystemExit, match=message):
        run_prepare(*[a.format(tmp=tmp_path) for a in args], "--out", tmp_path / "data")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("args", [["--vocab-size", "300"], ["--tokenizer", "byte", "--vocab-size", "300"]])
def test_vocab_size_without_bpe_is_a_usage_error(args, corpus, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_prepare("--data", corpus, "--out", tmp_path / "data", *args)
    assert "--vocab-size is for --tokenizer bpe" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_a_prepared_folder_is_replaced_only_with_overwrite(corpus, tmp_path):
    out = tmp_path / "data"
    run_prepare("--data", corpus, "--out", out, "--workers", 1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit, match="already holds a prepared corpus; pass --overwrite"):
        run_prepare("--data", corpus, "--out", out, "--tokenizer", "byte")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    run_prepare("--data", corpus, "--out", out, "--tokenizer", "byte", "--overwrite", "--workers", 1)
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temporary files left
    assert load_prepared(out).tokenizer.kind == "byte"


@pytest.mark.slow
def test_the_command_line_prepares_a_folder_that_python_m_train_trains_from(corpus, tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    command = [sys.executable, "-m", "train.prepare", "--data", str(corpus), "--out", str(data), "--workers", "2"]
    proc = subprocess.run(
        [*command, "--tokenizer", "bpe", "--vocab-size", "280"],
        cwd=REPO,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"into {data}" in proc.stdout and "1 files" in proc.stdout
    run_trainer("--data", data, "--out", run, "--max-iters", 2, *TINY_TRAIN_ARGS)
    _, tokenizer, meta = load_checkpoint(run)
    assert tokenizer.to_dict() == load_prepared(data).tokenizer.to_dict()
    assert meta["corpus_sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()


def test_a_checkpoints_tokenizer_prepares_a_corpus_to_fine_tune_it_on(corpus, tmp_path):
    base = tmp_path / "base"
    train(config(corpus, base, "--tokenizer", "bpe", "--vocab-size", 280, "--max-iters", 1))
    new = tmp_path / "new.txt"
    new.write_text("Zoë said: «déjà vu» ⚡ and the fox jumped.\n" * 60, encoding="utf-8")
    run_prepare("--data", new, "--out", tmp_path / "data", "--tokenizer", base, "--workers", 2)
    base_tokenizer = load_checkpoint(base)[1].to_dict()
    assert load_prepared(tmp_path / "data").tokenizer.to_dict() == base_tokenizer
    tuned = tmp_path / "tuned"
    train(
        parse_config(
            ["--data", str(tmp_path / "data"), "--out", str(tuned), "--init-from", str(base), "--max-iters", "2", *RUN]
        )
    )
    _, tokenizer, meta = load_checkpoint(tuned)
    assert tokenizer.to_dict() == base_tokenizer
    assert meta["init_from"]["path"] == str((base / "model.safetensors").resolve())
    assert meta["corpus_sha256"] == hashlib.sha256(new.read_bytes()).hexdigest()


def test_a_character_checkpoint_lacking_the_corpus_characters_is_refused_naming_them(corpus, tmp_path):
    base = tmp_path / "base"
    train(config(corpus, base, "--max-iters", 1))
    new = tmp_path / "new.txt"
    new.write_text("Zoë ⚡\n" * 50, encoding="utf-8")
    with pytest.raises(SystemExit, match="the text has characters not in the vocabulary: 'Z', 'ë', '⚡'.*byte or BPE"):
        run_prepare("--data", new, "--out", tmp_path / "data", "--tokenizer", base, "--workers", 2)
    assert not (tmp_path / "data").exists()


def test_a_tokenizer_that_is_neither_a_kind_nor_a_checkpoint_is_refused(corpus, tmp_path):
    with pytest.raises(SystemExit, match="--tokenizer .*nothing: not char, byte, bpe or a usable checkpoint"):
        run_prepare("--data", corpus, "--out", tmp_path / "data", "--tokenizer", tmp_path / "nothing")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("pattern", ["", "/abs/*.py"])
def test_a_glob_that_is_not_a_file_name_pattern_is_a_usage_error(pattern, corpus, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_prepare("--data", corpus.parent, "--glob", pattern, "--out", tmp_path / "data")
    assert "--glob" in capsys.readouterr().err and not (tmp_path / "data").exists()


def test_an_out_that_cannot_be_made_is_one_line_naming_it(corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match="python -m train.prepare: .*file/data"):
        run_prepare("--data", corpus, "--out", blocker / "data")


def test_batches_from_a_token_file_read_ahead_yet_equal_batches_from_memory(tmp_path, monkeypatch):
    ids = torch.randint(0, 60000, (5000,))
    ids.numpy().astype("uint16").tofile(tmp_path / "train.bin")
    file = TokenFile(tmp_path / "train.bin", "uint16", len(ids))
    reads = []
    read = file._read
    monkeypatch.setattr(file, "_read", lambda starts, length: reads.append(starts) or read(starts, length))
    in_memory, on_disk = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(5):
        x, y = get_batch(ids, 4, 16, in_memory)
        x_file, y_file = get_batch(file, 4, 16, on_disk)
        assert torch.equal(x_file, x) and torch.equal(y_file, y)
        # reading ahead draws from a copy: the generator moves as far as from memory, so a resume is unchanged
        assert torch.equal(on_disk.get_state(), in_memory.get_state())
    file._ahead[2].result()  # the sixth batch, being read ahead in the background: let it land
    assert len(reads) == 6  # each batch read once, in the step before it, and the sixth is ahead already
    # a batch that was not the one read ahead (another generator: evaluation's) is read there and then
    other = torch.Generator().manual_seed(9)
    x_file, _ = get_batch(file, 4, 16, other)
    assert torch.equal(x_file, get_batch(ids, 4, 16, torch.Generator().manual_seed(9))[0])
