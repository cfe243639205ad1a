"""The asyncio face of the engine, for the server: submit, stream events, abort, stats, shutdown.

The step loop runs in its own thread (model work never blocks the event loop). `submit` is called
on the event loop; the engine thread hands each event back with `call_soon_threadsafe`, and
`RequestStream` yields them in order until the final `Finished` / `Failed`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from irg_engine import events as ev
from irg_engine.config import EngineConfig, EngineStats
from irg_engine.engine import Engine
from irg_engine.host_memory import KEEP_BYTES, free_heap_bytes, release_free_memory
from irg_engine.model.bagel import LoadedModel
from irg_engine.recipes.params import RecipeParams
from irg_engine.request import Request

log = logging.getLogger("irg_engine")


class RequestStream:
    """The events of one request, in order; iteration ends after the final event.

    `on_final`, if set, runs on the event loop as soon as the final event arrives, before anyone
    reads it: the engine is done with the request even while its reader lags behind."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.id = request_id
        self._loop = loop
        self._queue: asyncio.Queue[ev.Event] = asyncio.Queue()
        self.final: ev.Event | None = None
        self.on_final: Callable[[ev.Event], None] | None = None

    def push_threadsafe(self, event: ev.Event) -> None:
        self._loop.call_soon_threadsafe(self._arrive, event)

    def _arrive(self, event: ev.Event) -> None:
        self._queue.put_nowait(event)
        if isinstance(event, ev.FINAL) and self.on_final is not None:
            self.on_final(event)

    def __aiter__(self) -> AsyncIterator[ev.Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ev.Event]:
        while self.final is None:
            event = await self._queue.get()
            if isinstance(event, ev.FINAL):
                self.final = event
            yield event


ENGINE_THREAD = "irg-engine"
STALL_S = 60.0  # a loop that has not come round for this long is reported as stuck
IDLE_TRIM_S = 10.0  # an engine idle this long gives its free heap back (`host_memory`)
BUSY_TRIM_S = 60.0  # under load, at most this often, when more than KEEP_BYTES of it is free


class EngineClient:
    def __init__(self, model: LoadedModel, config: EngineConfig | None = None) -> None:
        self.model = model
        self.engine = Engine(model, config)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # Called (on the engine's thread) if the loop stops while not shutting down.
        self.on_death: Callable[[], None] | None = None
        self._beat = time.monotonic()  # when the loop last came round

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=ENGINE_THREAD, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException:  # this thread's end: said here, and handled below
            log.exception("the engine loop failed")
        finally:
            if not self._stop.is_set():
                self._died()

    def _died(self) -> None:
        """The loop stopped on its own (an error it could not survive, e.g. one raised while
        it handled another): nothing will run again, so take no more work and end the rest."""
        engine = self.engine
        log.critical("the engine loop stopped; failing every request")
        with engine.lock:
            engine.accepting = False
        engine.guard.fault = "the engine loop stopped"
        try:
            engine.fail_all("engine_error", "the engine loop stopped")
        except Exception:  # the server's deadlines still end those requests
            log.exception("could not fail the requests in flight")
        if self.on_death is not None:
            self.on_death()

    def _run(self) -> None:
        engine = self.engine
        idle_since: float | None = None  # None once the free heap went back, until busy again
        trimmed = time.monotonic()
        while not self._stop.is_set():
            self._beat = time.monotonic()
            try:
                busy = engine.step()
            except Exception as error:  # the loop itself must survive; fail what is in flight
                log.exception("engine loop error")
                engine.guard.fault = f"{type(error).__name__}: {error}"
                engine.fail_all("engine_error", f"engine error: {error}")
                busy = False
            now = self._beat
            if busy or not engine.idle:
                idle_since = now
                # Constant load never goes idle: the heap grew from 2.4 to a 4.1 GB plateau
                # with ~0.6 GB in use in a soak.
                if now - trimmed > BUSY_TRIM_S and free_heap_bytes() > KEEP_BYTES:
                    release_free_memory()
                    trimmed = now
            elif idle_since is not None and now - idle_since > IDLE_TRIM_S:
                release_free_memory()
                idle_since, trimmed = None, now
            if not busy:
                with engine.lock:
                    if not engine.waiting and not engine._aborts:
                        engine.wake.wait(timeout=0.05)

    async def shutdown(self, timeout_s: float) -> None:
        """Stop admitting, let in-flight requests finish up to the timeout, end the rest."""
        with self.engine.lock:
            self.engine.accepting = False
        end = time.monotonic() + timeout_s
        while not self.engine.idle and time.monotonic() < end:
            await asyncio.sleep(0.05)
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self.engine.fail_all("shutdown", "server shutting down")
        await asyncio.to_thread(self.engine.close)  # joins the image workers: off the event loop

    # -- requests -----------------------------------------------------------------------------
    def submit(
        self, params: RecipeParams, request_id: str | None = None, deadline: float | None = None
    ) -> RequestStream:
        """Queue a request; raises OverflowError when the queue is full, RuntimeError while
        shutting down."""
        stream = RequestStream(request_id or uuid.uuid4().hex, asyncio.get_running_loop())
        self.engine.add(Request(stream.id, params, stream.push_threadsafe, deadline))
        return stream

    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    def stats(self) -> EngineStats:
        return replace(self.engine.stats(), healthy=self.healthy, fault=self.fault)

    @property
    def healthy(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive()
        return alive and self.engine.guard.healthy and not self._stalled()

    @property
    def fault(self) -> str | None:
        if self.engine.guard.fault is None and self._stalled():
            return f"the engine loop has not come round for {time.monotonic() - self._beat:.0f} s"
        return self.engine.guard.fault

    def _stalled(self) -> bool:
        """The loop is stuck in one step or job (a hung kernel, a job that never returns): the
        requests it holds wait, so readiness says so. Legitimate long work (a 1024 px VAE job
        run by the loop on the CPU) takes ~10 s."""
        running = self._thread is not None and not self._stop.is_set()
        return running and time.monotonic() - self._beat > STALL_S
