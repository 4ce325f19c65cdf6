"""python -m app [--checkpoint PATH ...] [--host H] [--port P]

SIGTERM (or Ctrl-C) drains: /ready turns 503 and new requests get 503 at once, streams in
flight may finish for up to QUILL_DRAIN_TIMEOUT seconds, the rest end with an error event,
and the process exits 0. A second signal exits at once.
"""
import argparse
import asyncio
import logging

import uvicorn

from app.main import create_app
from app.settings import Settings


class DrainingServer(uvicorn.Server):
    def __init__(self, config, service, drain_timeout):
        super().__init__(config)
        self.service, self.drain_timeout, self.draining = service, drain_timeout, False

    def handle_exit(self, sig, frame):
        if self.draining:  # second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self.draining = True
        self.service.draining = True  # effective at once, before the loop runs again
        self.service.ready = False
        asyncio.get_event_loop().call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self):
        await self.service.drain(self.drain_timeout)
        self.should_exit = True  # deliberately not re-raising the signal: a drained exit is exit 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m app", description="Serve Quill checkpoints over HTTP.")
    p.add_argument("--checkpoint", action="append", help="run directory or .safetensors file; repeat "
                   "to serve several (the first is the default); default: the bundled checkpoints")
    p.add_argument("--host", help="default 127.0.0.1 (QUILL_HOST); 0.0.0.0 to listen on all interfaces")
    p.add_argument("--port", type=int, help="default 8000 (QUILL_PORT)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (QUILL_DEVICE)")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in {"checkpoints": args.checkpoint, "host": args.host, "port": args.port,
                                   "device": args.device}.items() if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    # h11 buffers at most this much of a request head; past our own header limit, so that heads up to 8x it
    # get our 431 in the API's error shape rather than h11's bare 400, however the bytes arrive
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            h11_max_incomplete_event_size=8 * settings.max_header_bytes)
    server = DrainingServer(config, app.state.service, settings.drain_timeout)
    server.run()


if __name__ == "__main__":
    main()
