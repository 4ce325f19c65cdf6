"""`python -m app` start-up: each way it can fail is one or two lines and a non-zero exit, before any model
loads where it can be; `--checkpoint` takes several paths; `--help` says how to add your own run."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from service_helpers import REPO, free_port, running_server, wait_until

from app.__main__ import parse_args
from model.checkpoint import BUNDLED

pytestmark = pytest.mark.slow

LOADING = "INFO quill: loading"  # the line logged just before the first model loads


def start(*args, env=None):
    """`python -m app ARGS --port P` as a user runs it, expected to fail; bounded, however slow torch's import."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    if "--port" not in args:
        args = (*args, "--port", str(free_port()))
    return subprocess.run(
        [sys.executable, "-m", "app", *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def assert_short_failure(proc):
    """Non-zero, at most two lines on stderr, no traceback; returns stderr."""
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
    return proc.stderr


def test_a_missing_checkpoint_fails_in_one_line_naming_it_before_anything_loads(tmp_path):
    missing = tmp_path / "no-such-run"
    err = assert_short_failure(start("--checkpoint", missing))
    assert str(missing) in err and "no such checkpoint" in err
    assert LOADING not in err


def test_a_truncated_checkpoint_fails_in_two_lines_naming_it_and_why(checkpoints, tmp_path):
    run = tmp_path / "cut-short"
    run.mkdir()
    whole = (checkpoints["tiny-gpt"] / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(whole[: len(whole) // 2])
    err = assert_short_failure(start("--checkpoint", run))
    assert str(run / "model.safetensors") in err
    assert "corrupted" in err or "truncated" in err


def test_two_checkpoints_of_one_name_fail_in_one_line_like_every_start_up_failure(checkpoints, tmp_path):
    (tmp_path / "tiny-gpt").symlink_to(checkpoints["tiny-lstm"])
    err = assert_short_failure(start("--checkpoint", checkpoints["tiny-gpt"], tmp_path / "tiny-gpt"))
    assert err.startswith("python -m app: two checkpoints are both named 'tiny-gpt'") and LOADING not in err


def test_one_checkpoint_listed_twice_says_so_in_one_line(checkpoints):
    err = assert_short_failure(start("--checkpoint", checkpoints["tiny-gpt"], checkpoints["tiny-gpt"]))
    assert err.strip() == f"python -m app: {checkpoints['tiny-gpt']} is listed twice: name each checkpoint once"


def test_a_default_model_that_is_not_served_fails_in_one_line_before_anything_loads(checkpoints):
    err = assert_short_failure(start("--checkpoint", checkpoints["tiny-gpt"], env={"QUILL_DEFAULT_MODEL": "nope"}))
    assert err.startswith("python -m app: QUILL_DEFAULT_MODEL='nope' is not served") and LOADING not in err


def test_a_port_in_use_fails_in_one_line_before_any_model_loads(checkpoints):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = assert_short_failure(start("--checkpoint", checkpoints["tiny-gpt"], "--port", port))
    assert f"127.0.0.1:{port}" in err and "in use" in err
    assert LOADING not in err and "serving" not in err  # decided before the models, not after


# `python -m app` whose models take 2 s more to load, as the bundled ones do on a busy machine: a second server
# started meanwhile passes the early port check of the first (which used to bind without listening).
SLOW_LOAD = """
import runpy, time
from app import serving
load = serving.load_served_model
serving.load_served_model = lambda *args, **kwargs: time.sleep(2) or load(*args, **kwargs)
runpy.run_module("app", run_name="__main__", alter_sys=True)
"""


def test_two_servers_started_together_on_one_port_one_serves_and_the_other_fails_in_one_line(checkpoints, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", SLOW_LOAD, "--checkpoint", str(checkpoints["tiny-gpt"]), "--port", str(port)]
    logs = [tmp_path / "first.err", tmp_path / "second.err"]
    procs = []
    try:
        for log in logs:  # 0.3 s apart, as two `make serve` typed in two terminals
            with open(log, "w") as stderr:
                procs.append(subprocess.Popen(command, cwd=REPO, env=env, stderr=stderr, stdout=subprocess.DEVNULL))
            time.sleep(0.3)
        # the one that fails exits by itself; the one that serves keeps going until the test stops it
        assert wait_until(lambda: any(p.poll() is not None for p in procs), 120), "neither server exited"
        failed = next(i for i, p in enumerate(procs) if p.poll() is not None)
        served = wait_until(lambda: ready(port) or procs[1 - failed].poll() is not None, 90) and ready(port)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    err = logs[failed].read_text()
    assert served, f"neither server serves: {err}; {logs[1 - failed].read_text()}"
    assert procs[failed].returncode == 1 and procs[1 - failed].returncode == -signal.SIGKILL  # killed here
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"127.0.0.1:{port}" in err and "in use" in err


def ready(port):
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.parametrize(
    "args, env, named",
    [((), {"QUILL_MAX_RUNNING": "0"}, "max_running"), (("--device", "banana"), {}, "banana")],
    ids=["limit", "device"],
)
def test_a_bad_setting_fails_in_one_line_naming_it(checkpoints, args, env, named):
    err = assert_short_failure(start("--checkpoint", checkpoints["tiny-gpt"], *args, env=env))
    assert named in err and LOADING not in err


def test_checkpoint_takes_several_paths_and_may_be_repeated(checkpoints, tmp_path):
    command = [
        "-m",
        "app",
        "--checkpoint",
        str(checkpoints["tiny-gpt"]),
        str(checkpoints["tiny-lstm"]),
        "--checkpoint",
        str(checkpoints["byte-gpt"]),
    ]
    with running_server(command, log_path=tmp_path / "server.log") as server:
        models = httpx.get(server.url + "/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["tiny-gpt", "tiny-lstm", "byte-gpt"]


def test_help_shows_how_to_serve_your_own_run_next_to_the_bundled_ones(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "--checkpoint checkpoints/" in line)
    named = [word for word in line.split() if word.startswith("checkpoints/")]
    assert named and all((BUNDLED.parent / path / "model.safetensors").is_file() for path in named)  # they exist
    assert "runs/my-run" in line and "QUILL_CHECKPOINTS" in out


# `python -m app` whose models never finish loading: a stop asked for meanwhile lands in the load, on any machine.
ENDLESS_LOAD = """
import runpy, time
from app import serving
serving.load_served_model = lambda *args, **kwargs: time.sleep(3600)
runpy.run_module("app", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_while_the_models_load_is_one_line_not_a_traceback(checkpoints, sig):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", ENDLESS_LOAD, "--checkpoint", str(checkpoints["tiny-gpt"]), "--port", str(free_port())],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert any(LOADING in line for line in proc.stderr)  # read up to the line that says the load has begun
        proc.send_signal(sig)
        err = proc.stderr.read()
        assert proc.wait(timeout=60) != 0
    finally:
        proc.kill()
        proc.wait()
    assert err.strip() == "python -m app: stopped before serving"


FAILING_ENGINE = """
import runpy
from model import engine_process
def fail(self):
    raise RuntimeError("the engine process could not start: OutOfMemoryError: CUDA out of memory")
engine_process.EngineProcess.start = fail
runpy.run_module("app", run_name="__main__", alter_sys=True)
"""


def test_a_model_that_cannot_start_after_the_port_opened_ends_the_server_in_one_line_and_exit_1(checkpoints):
    inherited = {k: v for k, v in os.environ.items() if k != "QUILL_ENGINE_PROCESS"}  # the default engine
    env = {**inherited, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", FAILING_ENGINE, "--checkpoint", str(checkpoints["tiny-gpt"])]
    port = ["--port", str(free_port())]
    proc = subprocess.run([*command, *port], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "python -m app: model tiny-gpt: could not start: the engine process could not start: OutOfMemoryError: "
        "CUDA out of memory; exiting so that a supervisor restarts the server"
    )
    assert "Traceback" not in proc.stderr


EMBEDDING = """
from fastapi.testclient import TestClient
from app.main import app
{guard}
    with TestClient(app) as client:
        print(client.get("/ready").json()["status"])
"""


@pytest.mark.parametrize("guard", ["if True:", 'if __name__ == "__main__":'], ids=["unguarded", "guarded"])
def test_a_script_that_embeds_the_app_is_told_the_guard_it_lacks(checkpoints, tmp_path, guard):
    """The engine process (spawned) runs the user's script again as it starts: without the guard, the script's
    server start fails there; the error says so and names the guard, and with the guard the script serves."""
    script = tmp_path / "serve_it.py"
    script.write_text(EMBEDDING.format(guard=guard))
    inherited = {k: v for k, v in os.environ.items() if k != "QUILL_ENGINE_PROCESS"}  # the default engine
    env = {**inherited, "PYTHONPATH": str(REPO), "QUILL_CHECKPOINTS": str(checkpoints["tiny-gpt"])}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    if guard.startswith("if __name__"):
        assert (proc.returncode, proc.stdout) == (0, "ready\n"), proc.stderr[-2000:]
        return
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: the engine process could not start: the engine process exited with code 1.")
    assert f"runs {script} again as it starts" in last and 'if __name__ == "__main__":' in last
