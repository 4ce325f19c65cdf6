"""What the README's commands write stays out of `git status`: every `--out` of its shell blocks and the
exports folder are git-ignored, while the two bundled runs under checkpoints/ stay tracked."""

import re
import shlex
import shutil
import subprocess

import pytest
from helpers import REPO

from model.export import EXPORTS

BUNDLED = ("checkpoints/shakespeare-gpt", "checkpoints/shakespeare-lstm")

pytestmark = pytest.mark.skipif(
    shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs git and a clone of the repository"
)


def readme_outs():
    """The paths that `--out` names in the README's shell blocks."""
    blocks = re.findall(r"^```(?:sh|bash)\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)
    outs = set()
    for block in blocks:
        words = shlex.split(block.replace("\\\n", " "), comments=True)
        outs |= {words[i + 1] for i, word in enumerate(words[:-1]) if word == "--out"}
    return sorted(outs)


def ignored(path):
    """Whether git ignores `path` (relative to the repository root), tracked or not."""
    done = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=REPO)
    assert done.returncode in (0, 1)
    return done.returncode == 0


def test_the_readme_names_user_runs_prepared_data_and_the_bundled_runs():
    outs = readme_outs()
    assert "data/mine" in outs and any(o.startswith("checkpoints/my-") for o in outs)
    assert set(BUNDLED) <= set(outs)  # the recipe that retrains them


@pytest.mark.parametrize("out", [o for o in readme_outs() if o not in BUNDLED])
def test_a_folder_the_readme_writes_into_is_git_ignored(out):
    assert ignored(f"{out}/model.safetensors")


def test_exports_go_to_a_git_ignored_folder():
    assert ignored(f"{EXPORTS}/shakespeare-gpt-f16.gguf") and ignored(f"{EXPORTS}/shakespeare-gpt-hf/config.json")


@pytest.mark.parametrize("run", BUNDLED)
def test_the_bundled_runs_are_not_ignored_but_their_resume_state_is(run):
    assert not ignored(f"{run}/model.safetensors") and not ignored(f"{run}/log.jsonl")
    assert ignored(f"{run}/resume.safetensors")
