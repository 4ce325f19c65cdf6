"""README.md's "Tokenizers, large corpora, fine-tuning" commands, run as printed in a folder laid out as
they expect (my.txt, books/, src/, the bundled checkpoints). A training command is stopped with Ctrl-C
once it has saved its first checkpoint and taken a step; the checkpoint must load. The prepare command
runs to its end."""

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO

from model import load_checkpoint
from train.data import load_prepared

pytestmark = pytest.mark.slow

SECTION = "### Tokenizers, large corpora, fine-tuning"
TEXT = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer;\n"


def readme_commands():
    section = (REPO / "README.md").read_text().split(SECTION, 1)[1]
    block = re.search(r"^```sh\n(.*?)^```", section, re.S | re.M).group(1)
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


COMMANDS = readme_commands()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """my.txt (characters the bundled GPT knows, so that it can be fine-tuned on it), books/ and src/."""
    root = tmp_path_factory.mktemp("readme-train")
    (root / "my.txt").write_text(TEXT * 300)
    for name, text in [("books/a/one.txt", TEXT * 100), ("books/two.txt", TEXT * 50), ("src/x.py", "x = 1\n" * 500)]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "shakespeare-gpt").symlink_to(REPO / "checkpoints" / "shakespeare-gpt")
    return root


def run_until_first_checkpoint(words, cwd, env, timeout=900):  # a safety net; a first step takes seconds
    out = cwd / words[words.index("--out") + 1]
    proc = subprocess.Popen(words, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout

    def trained_a_step():  # logged after the first evaluation's checkpoint and the first step
        log = out / "log.jsonl"
        return log.exists() and '"kind": "train"' in log.read_text()

    while not trained_a_step() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the trainer stops, naming its last checkpoint
    output = proc.communicate(timeout=300)[0]  # a safety net too: a busy machine can take a while to stop it
    assert (out / "model.safetensors").exists(), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    return out


def test_readme_train_section_has_the_commands_it_documents():
    joined = "\n".join(COMMANDS)
    assert "--tokenizer bpe" in joined and "train.prepare" in joined and "--init-from" in joined


@pytest.mark.parametrize("i", range(len(COMMANDS)), ids=[c[:60] for c in COMMANDS])
def test_readme_train_command_works_as_printed(workdir, i):
    words = shlex.split(COMMANDS[i])
    assert words[:2] == ["python", "-m"], COMMANDS[i]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    env["OMP_NUM_THREADS"] = "1"
    for earlier in range(i):  # a command may need what an earlier one made (the prepared folder)
        if "train.prepare" in COMMANDS[earlier] and not (workdir / "data" / "mine" / "meta.json").exists():
            subprocess.run(shlex.split(COMMANDS[earlier]), cwd=workdir, env=env, check=True, capture_output=True)
    if words[2] == "train.prepare":
        done = subprocess.run(words, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        corpus = load_prepared(workdir / words[words.index("--out") + 1])
        assert corpus.tokenizer.kind == "bpe" and len(corpus.splits["train"]) > 0
        return
    _, tokenizer, meta = load_checkpoint(run_until_first_checkpoint(words, workdir, env))
    if "--init-from" in words:
        assert meta["init_from"]["path"].endswith("shakespeare-gpt/model.safetensors")
    if "--tokenizer" in words:
        assert tokenizer.kind == words[words.index("--tokenizer") + 1]
