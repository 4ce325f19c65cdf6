"""The Makefile's set-up: serving never installs system packages, the torch index is one switch, and
`make test` installs chromium only where it can (root with apt-get) and runs the tests either way.
Dry runs (`make -n`) read the recipes; the test-deps runs use fake `id`, `apt-get` and python on a
PATH without chromium, so they neither need root nor install anything."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def make(*args, env=None):
    return subprocess.run(
        [MAKE, "--no-print-directory", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def dry_run(*args):
    result = make("-n", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def torch_line(recipe):
    [line] = [line for line in recipe.splitlines() if "pip install" in line and "torch==" in line]
    return line


@pytest.mark.parametrize("target", ["serve", "install"])
def test_serve_and_install_never_install_system_packages(target):
    recipe = dry_run(target)
    assert "pip install" in recipe  # the dry run did print the recipe
    assert "apt-get" not in recipe and "sudo" not in recipe


def test_torch_index_goes_to_the_torch_install_only_when_given():
    assert "--index-url" not in dry_run("install")
    given = dry_run("install", "TORCH_INDEX=https://example.invalid/whl/cpu")
    assert "--index-url https://example.invalid/whl/cpu" in torch_line(given)
    assert given.count("--index-url") == 1  # the project's own dependencies keep the default index


def test_make_test_runs_test_deps_before_the_tests():
    recipe = dry_run("test")
    assert "apt-get install" in recipe  # test-deps' recipe, from the sub-make
    assert recipe.index("apt-get install") < recipe.index("-m pytest")


@pytest.fixture
def fake_system(tmp_path):
    """A PATH holding only fakes: `id -u` prints the uid we choose, `apt-get` and python log their
    arguments; no chromium. Returns (env for a uid, the log)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name in ("apt-get", "python"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n')
    (bin_dir / "id").write_text('#!/bin/sh\necho "$FAKE_UID"\n')
    for path in bin_dir.iterdir():
        path.chmod(0o755)

    def env(uid):
        return {"PATH": str(bin_dir), "FAKE_UID": str(uid)}

    return env, log, bin_dir / "python"


def calls(log):
    return log.read_text().splitlines() if log.exists() else []


def test_test_deps_as_root_installs_debian_chromium(fake_system):
    env, log, _ = fake_system
    result = make("test-deps", env=env(0))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "apt-get install -y -q chromium" in calls(log)


def test_test_deps_as_a_user_says_how_and_never_calls_apt_get(fake_system):
    env, log, _ = fake_system
    result = make("test-deps", env=env(1000))
    assert result.returncode == 0, result.stderr  # so that `make test` goes on; the browser tests skip
    assert "sudo apt-get install chromium" in result.stdout
    assert not any(call.startswith("apt-get") for call in calls(log))


def test_make_test_runs_the_tests_when_chromium_cannot_be_installed(fake_system):
    env, log, python = fake_system
    result = make("test", f"PYTHON={python}", env=env(1000))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "python -m pytest -q -rs" in calls(log)
    assert not any(call.startswith("apt-get") for call in calls(log))
