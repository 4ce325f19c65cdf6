"""Engine events into the event loop: the engines emit from their own threads (the engine thread, or the reader
thread of an engine process), and each request's events wait in an asyncio.Queue of the loop."""

import time
from collections import deque


class EventRelay:
    """Carries engine events into the event loop with one wake-up per burst instead of one per
    token: each call_soon_threadsafe writes the loop's self-pipe, and at 32 streams those
    syscalls and wake-ups, not the model, limited the tokens/s."""

    def __init__(self, loop):
        self.loop = loop
        self.pending = deque()
        self.scheduled = False

    def send(self, queue, event):  # engine thread
        self.pending.append((queue, (event, time.perf_counter())))
        if not self.scheduled:
            self.scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: the engine's emit cancels the request
                self.scheduled = False
                raise

    def _deliver(self):  # event loop; the flag is cleared first, so a send racing with us schedules anew
        self.scheduled = False
        while self.pending:
            queue, item = self.pending.popleft()
            queue.put_nowait(item)
