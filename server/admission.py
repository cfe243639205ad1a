"""Bounded admission: how many requests the server holds at once, and when it stops taking more.

A request holds a `Ticket` from admission until its answer is complete. At most
`max_running + max_queued` tickets exist; the engine runs `max_running` of them, so its queue never
holds more than `max_queued`. Over the cap -> 429 with a `Retry-After` estimated from recent
latencies; after `start_draining` (SIGTERM) -> 503. Everything runs on the event loop thread, so
plain integers need no lock.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from server.errors import ApiError

EWMA_WEIGHT = 0.2
MAX_RETRY_AFTER_S = 600


@dataclass(slots=True)
class Ticket:
    admission: Admission
    arrived: float  # time.monotonic()
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission._release(self)


class Admission:
    def __init__(self, max_running: int, max_queued: int) -> None:
        self.max_running = max_running
        self.capacity = max_running + max_queued
        self.in_flight = 0
        self.draining = False
        self._latency_ewma: float | None = None

    def admit(self) -> Ticket:
        """A ticket for one engine request, or an ApiError (503 draining, 429 full)."""
        return self.admit_many(1)[0]

    def admit_many(self, count: int) -> list[Ticket]:
        """Tickets for `count` engine requests, all or none."""
        if self.draining:
            raise ApiError(
                503,
                "draining",
                "the server is shutting down and takes no new requests",
                headers={"Retry-After": "5"},
            )
        if self.in_flight + count > self.capacity:
            raise ApiError(
                429,
                "queue_full",
                f"{self.in_flight} requests in flight, the limit is {self.capacity}; retry later",
                limit=self.capacity,
                headers={"Retry-After": str(self.retry_after())},
            )
        self.in_flight += count
        now = time.monotonic()
        return [Ticket(self, now) for _ in range(count)]

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: with `max_running` requests finishing in turn,
        one ends every (mean latency / max_running) seconds."""
        if self._latency_ewma is None:
            return 1
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(self._latency_ewma / self.max_running)))

    def observe_latency(self, seconds: float) -> None:
        if self._latency_ewma is None:
            self._latency_ewma = seconds
        else:
            self._latency_ewma += EWMA_WEIGHT * (seconds - self._latency_ewma)

    def start_draining(self) -> None:
        self.draining = True

    def _release(self, ticket: Ticket) -> None:
        self.in_flight -= 1
