"""python -m app [--checkpoint PATH [PATH ...]] [--host H] [--port P] [--device D] [--dtype T] [--quantize Q]
    [--no-compile]

Start-up checks what it can before loading any model (the settings, that each checkpoint exists, that
the port is free), and a failure to start is one line on stderr and exit 1, never a traceback.

An engine that dies or hangs is replaced (model/engine_process.py); one that keeps dying (a crash loop) makes
the server drain and exit 1, for its supervisor to restart.

SIGTERM or Ctrl-C drains: /ready turns 503 and new requests get 503 at once, streams in flight may
finish for up to QUILL_DRAIN_TIMEOUT seconds, the rest end with an `error` event (code server_shutdown),
and the process exits 0. Ctrl-C again ends them all at once, the same way; a third Ctrl-C kills it.
"""

import argparse
import asyncio
import errno
import logging
import signal
import socket

import uvicorn
from pydantic import ValidationError
from sse_starlette.sse import AppStatus

log = logging.getLogger("quill")

EPILOG = """\
Without --checkpoint, every run directory under checkpoints/ is served: the bundled models, and
yours if you trained it with --out checkpoints/NAME. The default model (for requests that name none)
is the bundled GPT, shakespeare-gpt, unless QUILL_DEFAULT_MODEL=NAME names another. To serve a run from
elsewhere next to the bundled ones, name them all (the first is the default model):
  python -m app --checkpoint checkpoints/shakespeare-gpt checkpoints/shakespeare-lstm runs/my-run
or set QUILL_CHECKPOINTS=checkpoints/shakespeare-gpt,runs/my-run. Every setting: README, "Settings".

Ctrl-C or SIGTERM drains (streams may finish for QUILL_DRAIN_TIMEOUT s); Ctrl-C again stops at once."""


class DrainingServer(uvicorn.Server):
    def __init__(self, config, service, drain_timeout):
        super().__init__(config)
        self.service, self.drain_timeout = service, drain_timeout
        self.stage = "starting"  # -> draining -> stopping (second Ctrl-C) ; finished once serve returns
        self.loop = None
        self.fatal = None  # why an engine gave up, when one has: the server drains and exits 1
        service.on_fatal = self.give_up

    async def serve(self, sockets=None):
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)
        self.stage = "finished"  # a signal now, after uvicorn gave the handler back to us, changes nothing

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.started and self.stage == "starting" and not self.should_exit:
            self.stage = "serving"
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            log.info("listening on http://%s:%d (Ctrl-C to stop)", f"[{host}]" if ":" in host else host, port)

    def handle_exit(self, sig, frame):
        # A signal handler: it runs in the main thread between two bytecodes, maybe inside the event loop's
        # own code, so it only sets flags and schedules the work onto the loop.
        if self.stage == "starting":  # warming up, nothing admitted yet: exit once started, nothing to drain
            self.should_exit = True
        elif self.stage == "serving":
            self.stage = "draining"
            self.service.stop_admitting()  # refuse new work before the loop runs again
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))
        elif self.stage == "draining" and sig == signal.SIGINT:
            self.stage = "stopping"
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a third Ctrl-C kills at once, whatever is stuck
            self.loop.call_soon_threadsafe(self._stop_now)
        # Otherwise nothing: in particular a repeated SIGTERM, which is what `make serve` sends. SIGTERM to its
        # process group reaches the server twice (make forwards its own to its child) and, when the two were
        # handled apart, the second one used to stop the server mid-drain.

    def give_up(self, why):
        """An engine gave up restarting (an engine's watchdog thread): drain like SIGTERM, then exit 1, so that
        what runs the server (compose's restart policy, Kubernetes) starts it anew."""
        self.fatal = why
        if self.stage == "starting":  # uvicorn has not started serving: nothing to drain
            self.should_exit = True
        elif self.loop and self.stage == "serving":
            self.stage = "draining"
            self.service.stop_admitting()
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self):
        n = self.service.in_flight()
        log.info("draining %d stream%s, up to %g s; Ctrl-C again to stop now", n, "s" * (n != 1), self.drain_timeout)
        await self.service.drain(self.drain_timeout)
        self.should_exit = True  # deliberately not re-raising the signal: a drained exit is exit 0

    def _stop_now(self):
        n = self.service.in_flight()
        log.info("stopping now: %d stream%s end%s with an error event", n, "s" * (n != 1), "s" * (n == 1))
        self.service.stop_now()


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m app",
        description="Serve Quill checkpoints over HTTP.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        nargs="+",
        action="extend",
        metavar="PATH",
        help="run directories or .safetensors files (the flag may be repeated); the first is the "
        "default model; default: every run under checkpoints/ (QUILL_CHECKPOINTS)",
    )
    p.add_argument("--host", help="default 127.0.0.1 (QUILL_HOST); 0.0.0.0 to listen on all interfaces")
    p.add_argument("--port", type=int, help="default 8000 (QUILL_PORT)")
    p.add_argument("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps (QUILL_DEVICE)")
    p.add_argument(
        "--dtype", help="weights' precision: auto (bfloat16 on a CUDA GPU, else float32), float32, bfloat16, float16"
    )
    p.add_argument("--quantize", help="none (the default), or int8: int8 linear weights, weight-only (QUILL_QUANTIZE)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the decode step in the background while serving eagerly (the default; kept in "
        "QUILL_COMPILE_CACHE, so later starts load it in seconds); --no-compile: never (QUILL_COMPILE=0)",
    )
    return p.parse_args(argv)


def bind(host, port):
    """The server's socket, bound and listening now so that a port in use fails before any model loads.
    Listening, not only bound: Linux lets two sockets with SO_REUSEADDR bind one port while neither listens, so
    a second server started meanwhile would pass this check and fail later. A connection made while the models
    load waits in the backlog until the server starts."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
    try:
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's backlog
    except OSError as e:
        sock.close()
        in_use = "; is another server running? choose another with --port (or QUILL_PORT)"
        hint = in_use if e.errno == errno.EADDRINUSE else ""
        raise SystemExit(f"python -m app: cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    return sock


def stop_starting(sig, frame):
    """Ctrl-C or SIGTERM before the server has taken the signals over: stop start-up quietly (main says so)."""
    for each in (signal.SIGINT, signal.SIGTERM):  # once: `make serve` sends SIGTERM twice (DrainingServer)
        signal.signal(each, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv=None):
    args = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop_starting)
    try:
        # imported here, inside the try: torch takes seconds to import, and Ctrl-C meanwhile is no error
        from app.main import create_app
        from app.registry import checkpoint_files
        from app.settings import Settings
        from model import CheckpointError
        from model.device import pick_device

        overrides = {
            k: v
            for k, v in {
                "checkpoints": args.checkpoint,
                "host": args.host,
                "port": args.port,
                "device": args.device,
                "compile": args.compile,
                "dtype": args.dtype,
                "quantize": args.quantize,
            }.items()
            if v is not None
        }
        try:
            settings = Settings(**overrides)
        except ValidationError as e:
            raise SystemExit(
                "python -m app: "
                + "; ".join(f"setting {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            ) from None
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        app = create_app(settings)
        app.state.start_in_background = True  # the port answers while the engines start: /ready says how far
        try:
            checkpoint_files(settings.checkpoints, settings.default_model)  # before the port and the load
            pick_device(settings.device)
            sock = bind(settings.host, settings.port)
            app.state.service.load()  # here rather than in the lifespan, whose failures uvicorn prints as tracebacks
        except CheckpointError as e:
            raise SystemExit(f"python -m app: cannot serve {e}") from None
        except ValueError as e:
            raise SystemExit(f"python -m app: {e}") from None
        except (OSError, RuntimeError) as e:  # an unreadable file, or a device that is not there
            raise SystemExit(f"python -m app: cannot load the models: {str(e).splitlines()[0]}") from None
    except KeyboardInterrupt:
        raise SystemExit("python -m app: stopped before serving") from None

    # h11 buffers at most this much of a request head; past our own header limit, so that heads up to 8x it
    # get our 431 in the API's error shape rather than h11's bare 400, however the bytes arrive
    config = uvicorn.Config(app, log_level="info", h11_max_incomplete_event_size=8 * settings.max_header_bytes)
    server = DrainingServer(config, app.state.service, settings.drain_timeout)
    # Our drain ends every stream with an event of its own; sse-starlette's would cancel them mid-stream.
    AppStatus.disable_automatic_graceful_drain()
    for sig in (signal.SIGINT, signal.SIGTERM):  # the handler uvicorn puts back when it is done, too
        signal.signal(sig, server.handle_exit)
    server.run(sockets=[sock])
    if server.fatal:
        raise SystemExit(f"python -m app: {server.fatal}; exiting so that a supervisor restarts the server")


if __name__ == "__main__":
    main()
