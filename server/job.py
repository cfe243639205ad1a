"""One admitted request, from its submission to the engine to its final event.

`Job.submit` hands the parameters to the engine (a ValueError there is the client's fault: 400).
`Job.events()` then yields the engine's events in order, plus `KEEPALIVE` after every
`keepalive_interval` of silence, and guarantees three things whoever consumes it:
- exactly one final event (`Finished` or `Failed`) ends it, even if the engine goes silent past
  the deadline or dies without answering (a safety net behind the engine's own deadline);
- a consumer that stops early (client disconnect, cancelled task) aborts the engine request, so
  its KV blocks are freed at once;
- metrics and the admission ticket are settled exactly once, when the engine's final event
  arrives rather than when the consumer reads it: a client that stops reading its stream (its
  socket's buffer full, the writer blocked) would otherwise hold its admission slot forever, and
  the deadline checks here only run while someone reads. Settling logs one line per request that
  reached the engine (id, recipe, size, time, tokens; or how it ended), at INFO, and at WARNING
  for an engine error.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

from irg_engine.events import FINAL, Failed, Finished, ImageDone, Started, TextDelta
from irg_engine.recipes.params import RecipeParams
from server.admission import Ticket
from server.errors import ApiError
from server.metrics import REASON_OF_FAILURE
from server.result import failure_error
from server.state import ServerState

log = logging.getLogger("irg.server")

KEEPALIVE = object()
# How long past its deadline a request may stay silent before the server gives up on the engine.
DEADLINE_GRACE_S = 2.0
# How long a request may stay silent while the engine reports a fault (no step succeeds).
FAULT_GRACE_S = 10.0
# How often a silent request checks those two conditions.
SAFETY_TICK_S = 0.5


def new_request_id() -> str:
    return "gen-" + uuid.uuid4().hex[:24]


class Job:
    def __init__(
        self,
        state: ServerState,
        params: RecipeParams,
        ticket: Ticket,
        timeout_s: float,
        request_id: str | None = None,
    ) -> None:
        self.state = state
        self.params = params
        self.ticket = ticket
        self.id = request_id or new_request_id()
        self.arrived = ticket.arrived
        self.deadline = ticket.arrived + timeout_s
        self.final: Finished | Failed | None = None
        self._stream = None
        self._first_think = False
        self._first_image = False

    def submit(self) -> None:
        try:
            self._stream = self.state.client.submit(
                self.params, request_id=self.id, deadline=self.deadline
            )
            self._stream.on_final = self._observe
        except ValueError as exc:
            self._settle(None, "invalid")
            raise ApiError(400, "invalid_request", str(exc)) from exc
        except OverflowError as exc:  # the engine's own queue cap (admission should prevent it)
            self._settle(None, "rejected")
            raise ApiError(429, "queue_full", str(exc), headers={"Retry-After": "1"}) from exc
        except RuntimeError as exc:  # the engine stopped admitting: shutting down, or its loop died
            self._settle(None, "rejected")
            code = "draining" if self.state.admission.draining else "unavailable"
            raise ApiError(503, code, str(exc), headers={"Retry-After": "5"}) from exc
        except BaseException:
            self._settle(None, "error")
            raise

    async def events(self) -> AsyncIterator[object]:
        client = self.state.client
        interval = self.state.settings.keepalive_interval
        it = self._stream.__aiter__()
        pending: asyncio.Future | None = None
        last_event = last_output = time.monotonic()
        self.state.open_streams += 1
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(it.__anext__())
                done, _ = await asyncio.wait({pending}, timeout=min(interval, SAFETY_TICK_S))
                now = time.monotonic()
                if not done:
                    if now > self.deadline + DEADLINE_GRACE_S:
                        yield self._give_up(Failed("timeout", "request deadline exceeded"))
                        return
                    if not client.healthy and now - last_event > FAULT_GRACE_S:
                        yield self._give_up(Failed("engine_error", f"engine fault: {client.fault}"))
                        return
                    if now - last_output >= interval:
                        last_output = now
                        yield KEEPALIVE
                    continue
                try:
                    event = pending.result()
                except StopAsyncIteration:
                    break
                pending, last_event, last_output = None, now, now
                if not isinstance(event, FINAL):  # (a final one was observed as it arrived)
                    self._observe(event)
                yield event
                if isinstance(event, FINAL):
                    return
            yield self._give_up(Failed("engine_error", "the engine ended the stream early"))
        finally:
            self.state.open_streams -= 1
            if pending is not None and not pending.done():
                pending.cancel()
            if self.final is None:
                # The consumer left before the end: free the engine's resources now.
                client.abort(self.id)
                self._settle(Failed("aborted", "client went away"), "abort")

    async def stream(self) -> AsyncIterator[object]:
        """`events()` for a streamed answer. The first event is awaited here, so a request that
        fails at once (deadline already past, engine refusal) raises its plain HTTP error
        instead of opening a stream only to report it."""
        events = self.events()
        first = await events.__anext__()
        if isinstance(first, Failed):
            await events.aclose()
            raise failure_error(first)

        async def chained() -> AsyncIterator[object]:
            try:
                yield first
                async for event in events:
                    yield event
            finally:
                await events.aclose()

        return chained()

    def cancel(self) -> None:
        """End a submitted job whose events nobody will read."""
        if self.final is None and not self.ticket.released:
            if self._stream is not None:
                self.state.client.abort(self.id)
            self._settle(Failed("aborted", "cancelled"), "abort")

    def _give_up(self, failed: Failed) -> Failed:
        self.state.client.abort(self.id)
        self._settle(failed, REASON_OF_FAILURE[failed.code])
        return failed

    def _observe(self, event: object) -> None:
        if isinstance(event, FINAL) and self.ticket.released:
            return  # the engine's answer to a request already ended here (timeout, abort)
        m = self.state.metrics
        elapsed = time.monotonic() - self.arrived
        if isinstance(event, Started):
            m.queue_time.observe(elapsed)
        elif isinstance(event, TextDelta) and event.stage == "think" and not self._first_think:
            self._first_think = True
            m.time_to_first_think_token.observe(elapsed)
        elif isinstance(event, ImageDone) and not self._first_image:
            self._first_image = True
            m.time_to_first_image.observe(elapsed)
        elif isinstance(event, Finished):
            m.prompt_tokens.inc(event.usage.get("prompt_tokens", 0))
            m.generated_tokens.inc(event.usage.get("generated_tokens", 0))
            self.state.admission.observe_latency(elapsed)
            self._settle(event, "ok")
        elif isinstance(event, Failed):
            self._settle(event, REASON_OF_FAILURE.get(event.code, "error"))

    def _settle(self, final: Finished | Failed | None, reason: str) -> None:
        if self.ticket.released:
            return
        self.final = final
        m = self.state.metrics
        elapsed = time.monotonic() - self.arrived
        m.e2e_latency.observe(elapsed)
        m.finish(reason)
        self.ticket.release()
        self._log(final, reason, elapsed)

    def _log(self, final: Finished | Failed | None, reason: str, elapsed: float) -> None:
        p = self.params
        what = f"{p.recipe} {p.width}x{p.height}"
        if isinstance(final, Finished):
            u = final.usage
            log.info(
                "request %s ok: %s in %.2f s, %d prompt + %d generated tokens, %d denoise steps",
                self.id,
                what,
                elapsed,
                u.get("prompt_tokens", 0),
                u.get("generated_tokens", 0),
                u.get("denoise_steps", 0),
            )
        elif isinstance(final, Failed):
            level = logging.WARNING if reason == "error" else logging.INFO
            message = f"request {self.id} {reason}: {what} after {elapsed:.2f} s: {final.message}"
            log.log(level, "%s", message)
