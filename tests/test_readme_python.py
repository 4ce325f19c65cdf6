"""README.md's `python` commands, run as a user runs them: in bash, after `. .venv/bin/activate` (what the README
says to do before its first one), with no other Python environment on PATH. Every module the README runs with
`python -m` answers --help; the blocks of commands that no other test runs are run line by line as printed, in a
folder laid out like the repository: a training command until it has saved a checkpoint and taken a step (then
Ctrl-C), a server until /ready answers (then SIGTERM), anything else to its end. The curl commands, the openai
example, the tokenizer and export blocks have tests of their own (tests/app/test_readme_curl.py,
tests/train/test_readme_train.py, tests/model/test_export.py, tests/model/test_export_hf.py)."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import save_gpt2, tiny_gpt
from service_helpers import REPO, free_port, wait_until

from model import CharTokenizer, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.slow

ACTIVATE = Path(sys.prefix) / "bin" / "activate"  # the environment these tests run in: make install's .venv
if not ACTIVATE.is_file():
    pytest.skip(f"not run from a virtual environment ({sys.prefix} has no bin/activate)", allow_module_level=True)

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"^```(?:sh|bash)\n(.*?)^```", README, re.S | re.M)
MODULES = sorted(set(re.findall(r"python -m (\w+(?:\.\w+)*)", README)))
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"  # `--data shakespeare` downloads it offline
TEXT = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer;\n"


def block(containing):
    """The README's shell block holding this text, as its commands (continuations joined, comments dropped)."""
    found = next(b for b in BLOCKS if containing in b)
    return [shlex.split(line, comments=True) for line in found.replace("\\\n", " ").splitlines() if line.strip()]


def user_env(**extra):
    """The environment of a user's new shell: no Python environment on PATH (activating one adds it), no
    PYTHONPATH, none of the test suite's QUILL_ settings."""
    ours = Path(sys.executable).parent.resolve()
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p).resolve() != ours)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUILL_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PATH": path, "OMP_NUM_THREADS": "1", **extra}


def activated(words, cwd, env, log):
    """`words` started in bash after `. .venv/bin/activate`, writing to `log`."""
    script = f". {shlex.quote(str(ACTIVATE))} && exec {shlex.join(words)}"
    with open(log, "ab") as out:
        return subprocess.Popen(["bash", "-c", script], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def test_the_readme_says_how_to_use_the_environment_before_its_first_python_command():
    before = README[: README.index("python -m")]
    assert ". .venv/bin/activate" in before and ".venv/bin/python" in before


@pytest.mark.parametrize("module", MODULES)
def test_every_module_the_readme_runs_answers_help_in_the_activated_environment(module, tmp_path):
    proc = activated(["python", "-m", module, "--help"], REPO, user_env(), tmp_path / "log")
    assert proc.wait(timeout=120) == 0, (tmp_path / "log").read_text()[-2000:]
    assert "usage:" in (tmp_path / "log").read_text()


def run(words, cwd, env, log):
    """One README line, as the user runs it; returns what it printed."""
    module = words[words.index("-m") + 1]
    proc = activated(words, cwd, env, log)
    exits = {0}
    try:
        if module == "app":
            port = env["QUILL_PORT"]
            assert wait_until(lambda: ready(port) or proc.poll() is not None, 120, 0.2) and ready(port), log.read_text()
            proc.send_signal(signal.SIGTERM)  # drains, then exits 0
        elif module == "train" and "--help" not in words:
            out = cwd / words[words.index("--out") + 1]
            steps = train_steps(out)  # --resume: a run that already took steps
            wait_until(lambda: train_steps(out) > steps or proc.poll() is not None, 600, 0.2)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # Ctrl-C: the trainer stops, naming its last checkpoint
                exits = {130}  # as a shell reports a command stopped by Ctrl-C
        assert proc.wait(timeout=300) in exits, log.read_text()[-3000:]
    finally:
        proc.kill()
        proc.wait()
    printed = log.read_text()
    assert "Traceback" not in printed, printed[-3000:]
    return printed


def ready(port):
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def train_steps(out):
    log = out / "log.jsonl"
    return log.read_text().count('"kind": "train"') if log.exists() else 0


def test_the_train_your_own_block_runs_as_printed(tmp_path):
    (tmp_path / "my.txt").write_text(TEXT * 300)
    env = user_env(QUILL_CACHE=str(tmp_path / "cache"))
    for words in block("--out checkpoints/my-model"):
        if words[0] != "python":  # torchrun: DDP's two processes, tested in tests/train
            continue
        if "shakespeare" in words and not SHAKESPEARE.exists():
            pytest.skip(f"`--data shakespeare` downloads Tiny Shakespeare; no copy at {SHAKESPEARE}")
        if "shakespeare" in words:
            (tmp_path / "cache").mkdir(exist_ok=True)
            shutil.copy(SHAKESPEARE, tmp_path / "cache" / "tinyshakespeare.txt")
        printed = run(words, tmp_path, env, tmp_path / "log")
        if "--help" in words:
            assert "usage: python -m train" in printed
        else:
            load_checkpoint(tmp_path / words[words.index("--out") + 1])


def test_serving_a_run_next_to_the_bundled_ones_runs_as_printed(tmp_path):
    (tmp_path / ".venv").symlink_to(sys.prefix)  # the command names .venv/bin/python
    (tmp_path / "checkpoints").symlink_to(REPO / "checkpoints")
    tokenizer = CharTokenizer.from_text(TEXT)
    save_checkpoint(tmp_path / "runs" / "my-run" / "model.safetensors", tiny_gpt(tokenizer.vocab_size), tokenizer, {})
    (words,) = block("runs/my-run")
    port = free_port()
    run(words, tmp_path, user_env(QUILL_PORT=str(port)), tmp_path / "log")
    assert "INFO quill: default model: shakespeare-gpt (the first checkpoint named;" in (tmp_path / "log").read_text()


def test_importing_a_gpt2_and_serving_it_runs_as_printed(tmp_path):
    pytest.importorskip("transformers")
    words = block("model.import_hf")
    save_gpt2(tmp_path / words[0][words[0].index("model.import_hf") + 1])  # path/to/gpt2
    env = user_env(QUILL_PORT=str(free_port()))
    for line in words:
        run(line, tmp_path, env, tmp_path / "log")
    assert "serving gpt2 (" in (tmp_path / "log").read_text()


def test_building_the_compiled_steps_ahead_runs_as_printed(tmp_path):
    """The README's builder command (for an image, or before a deploy) compiles every batch size it names into
    the user's cache folder, saying so for each."""
    (words,) = block("python -m model.compiled")
    (tmp_path / "checkpoints").symlink_to(REPO / "checkpoints")
    env = user_env(XDG_CACHE_HOME=str(tmp_path / "cache"))
    printed = run(words, tmp_path, env, tmp_path / "log")
    sizes = words[words.index("--sizes") + 1].split(",")
    assert [line for line in printed.splitlines() if line.startswith("built")] == [f"built {n}" for n in sizes]
    assert len(list((tmp_path / "cache" / "quill" / "compiled").glob("decode-*.pt2"))) == len(sizes)
