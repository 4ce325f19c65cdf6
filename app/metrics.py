"""Prometheus metrics, in a registry of the app's own (so tests can build many apps)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "quill_requests", "HTTP requests by route and final status", ["route", "status"], registry=r
        )
        self.running = Gauge("quill_requests_running", "requests in a decode batch", registry=r)
        self.queued = Gauge("quill_requests_queued", "requests admitted and waiting for a batch slot", registry=r)
        self.batch_size = Histogram(
            "quill_batch_size", "rows per decode step", registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128)
        )
        self.ttft = Histogram(
            "quill_time_to_first_token_seconds", "arrival to first token", registry=r, buckets=LATENCY_BUCKETS
        )
        self.token_latency = Histogram(
            "quill_inter_token_latency_seconds",
            "time between two tokens of a stream",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.tokens = Counter("quill_tokens_generated", "tokens generated", ["model"], registry=r)
        self.engine_restarts = Counter(
            "quill_engine_restarts",
            "engine processes that died (a failed start included) or hung, each replaced unless the engine gave up",
            ["model", "reason"],
            registry=r,
        )

    def track_engines(self, engines):
        """The gauges read the engines when scraped, so they can never drift from the truth."""
        self.running.set_function(lambda: sum(e.counts()[0] for e in engines))
        self.queued.set_function(lambda: sum(e.counts()[1] for e in engines))
