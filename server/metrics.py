"""Prometheus metrics of one server: what requests experienced and what the engine is doing.

Request-level series are recorded by `Job` as its events pass (time to first think token, time to
first image, queue time, end-to-end latency, finished requests by reason, usage). Engine-level
series (running / waiting requests, KV blocks, cumulative steps, tokens and denoise steps, health)
are read from `EngineClient.stats()` at scrape time by a collector, so they are never stale.
Each app owns its registry, so several servers in one process (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# `*_created` timestamps double the series count and no dashboard here reads them.
prometheus_client.disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FINISH_REASONS = ("ok", "abort", "error", "timeout", "rejected", "invalid", "shutdown")
# engine failure code -> finish reason label
REASON_OF_FAILURE = {
    "aborted": "abort",
    "timeout": "timeout",
    "engine_error": "error",
    "invalid_request": "invalid",
    "shutdown": "shutdown",
}
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1800)
FIRST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class EngineCollector(Collector):
    def __init__(self, stats: Callable[[], object | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator:
        s = self._stats()
        if s is None:
            return
        gauges = (
            ("irg_requests_running", "requests the engine is running", s.running),
            ("irg_requests_waiting", "requests waiting in the engine queue", s.waiting),
            ("irg_kv_blocks_used", "KV cache blocks in use", s.kv_blocks_used),
            ("irg_kv_blocks_total", "KV cache blocks in the pool", s.kv_blocks_total),
            ("irg_engine_healthy", "1 while the engine step loop is healthy", int(s.healthy)),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = (
            ("irg_engine_steps", "engine steps run", s.steps),
            (
                "irg_tokens_decoded",
                "text tokens decoded (think, reflect, answer)",
                s.tokens_decoded,
            ),
            ("irg_denoise_steps", "denoising steps run, per image", s.denoise_steps),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


class Metrics:
    def __init__(self, engine_stats: Callable[[], object | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.time_to_first_think_token = Histogram(
            "irg_time_to_first_think_token_seconds",
            "arrival to the first think text token",
            buckets=FIRST_BUCKETS,
            registry=r,
        )
        self.time_to_first_image = Histogram(
            "irg_time_to_first_image_seconds",
            "arrival to the first finished image",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "irg_queue_time_seconds",
            "arrival to the engine starting the request",
            buckets=FIRST_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "irg_e2e_request_latency_seconds",
            "arrival to the final event, every request that was admitted",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.finished = Counter(
            "irg_requests_finished",
            "requests that passed validation, by how they ended (rejected: refused by admission, "
            "429 / 503; invalid: refused by the engine at submit)",
            ["reason"],
            registry=r,
        )
        for reason in FINISH_REASONS:
            self.finished.labels(reason)  # every series exists from the start, at 0
        self.prompt_tokens = Counter(
            "irg_prompt_tokens", "prompt tokens of finished requests", registry=r
        )
        self.generated_tokens = Counter(
            "irg_generated_tokens", "generated tokens of finished requests", registry=r
        )
        r.register(EngineCollector(engine_stats))

    def finish(self, reason: str) -> None:
        self.finished.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
