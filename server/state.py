"""What one running server holds: settings, the loaded model, the engine client, admission and
metrics, and the lifecycle that ties them together.

Lifecycle: `load_model` (blocking, before serving) -> `start` (engine thread up, in the app's
lifespan) -> requests -> `drain` (SIGTERM: refuse new work with 503, let in-flight requests finish
up to the shutdown timeout, then the engine ends the rest with `shutdown`) -> `close`.
Readiness is the conjunction the load balancer needs: model loaded, engine healthy, not draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from irg_engine import checkpoint
from irg_engine.model.bagel import LoadedModel
from server.admission import Admission, Ticket
from server.errors import ApiError
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger("irg.server")
T = TypeVar("T")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# After the engine has ended every request, answers still being written get this long.
RESPONSE_FLUSH_S = 5.0
LOAD_THREAD = "irg-load"  # the daemon thread that loads the model (see `in_daemon_thread`)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_model(settings: Settings) -> LoadedModel:
    """The checkpoint the settings name, or the embedded tiny random model."""
    from irg_engine.generate import ensure_default_model

    path = settings.model if settings.model is not None else ensure_default_model()
    dtype = DTYPES.get(settings.dtype)  # None ("auto"): the loader's choice per device
    return checkpoint.load(path, device=resolve_device(settings.device), dtype=dtype)


async def in_daemon_thread(fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` in a daemon thread: `asyncio.to_thread`'s pool is waited for when
    `asyncio.run` ends, so a load still running (a slow disk, a config file that is a pipe)
    kept a server asked to stop from exiting. (`server.__main__` then leaves with `os._exit`.)"""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: object) -> None:
        if future.done():  # the awaiting task was cancelled
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run() -> None:
        try:
            outcome = (True, fn(*args))
        except BaseException as error:  # handed to the awaiting task
            outcome = (False, error)
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name=LOAD_THREAD, daemon=True).start()
    return await future


def make_engine(model: LoadedModel, settings: Settings):
    """The engine client for these settings (imported late: the engine pulls in the runner)."""
    from irg_engine.client import EngineClient
    from irg_engine.config import EngineConfig

    # Admission keeps the engine's queue within max_queued; the engine's own cap is only a
    # backstop, with room for a request that finished but is not yet off its running list.
    kwargs = {
        "max_running": settings.max_running,
        "max_waiting": settings.max_queued + settings.max_running,
        "decode_graphs": settings.decode_graphs,
        "decode_ahead": settings.decode_ahead == "on",
        "cpu_threads": settings.cpu_threads,
    }
    if settings.attention_backend != "auto":
        kwargs["attention_backend"] = settings.attention_backend
    return EngineClient(model, EngineConfig(**kwargs))


@dataclass
class ServerState:
    settings: Settings
    model: LoadedModel | None = None  # None until `load_and_start` has loaded it
    # Called when the server cannot serve: the model failed to load, or the engine loop stopped.
    on_fatal: Callable[[], None] | None = None
    client: object | None = None
    fatal: str | None = None
    admission: Admission = field(init=False)
    metrics: Metrics = field(init=False)
    started_at: float = field(default_factory=time.time)
    # Requests whose events a route is still reading (`Job.events`); their admission tickets
    # are released when the engine finishes, which can be before the route has written the end.
    open_streams: int = field(default=0, init=False)
    _drain_task: asyncio.Task | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.settings.max_running, self.settings.max_queued)
        self.metrics = Metrics(self.engine_stats)

    @property
    def model_id(self) -> str:
        if self.model is not None:
            return self.model.name
        return self.settings.model.name if self.settings.model else "irg-tiny-random (loading)"

    @property
    def random_weights(self) -> bool | None:
        return None if self.model is None else self.model.random_weights

    def loaded_model(self) -> LoadedModel:
        """The model, or a 503 while it is still loading (or failed to)."""
        if self.model is None:
            _, reason = self.readiness()
            raise ApiError(503, "unavailable", f"not ready: {reason}", headers={"Retry-After": "5"})
        return self.model

    def engine_stats(self):
        return self.client.stats() if self.client is not None else None

    def start(self) -> None:
        if self.client is None:
            self.client = make_engine(self.model, self.settings)
            self.client.on_death = self.on_fatal
            self.client.start()
            log.info("engine started on %s", self.model_id)

    async def load_and_start(self) -> None:
        """Load the model in a worker thread (the probes answer meanwhile), then start."""
        try:
            if self.model is None:
                log.info("loading %s", self.settings.model or "the embedded tiny random model")
                self.model = await in_daemon_thread(load_model, self.settings)
            self.start()
        except Exception as exc:
            self.fatal = f"{type(exc).__name__}: {exc}"
            log.error("cannot start: %s", self.fatal)
            if self.on_fatal is not None:
                self.on_fatal()

    def admit(self) -> Ticket:
        return self.admit_many(1)[0]

    def admit_many(self, count: int) -> list[Ticket]:
        """Admission tickets; a refusal (429, 503) is counted as a `rejected` request."""
        try:
            if self.client is None and not self.admission.draining:
                _, reason = self.readiness()
                raise ApiError(
                    503, "unavailable", f"not ready: {reason}", headers={"Retry-After": "5"}
                )
            # An engine with a fault still takes work: /ready keeps balancers away, and the
            # next step that succeeds clears the fault (a transient one should not need a
            # restart).
            return self.admission.admit_many(count)
        except ApiError:
            self.metrics.finish("rejected")
            raise

    def readiness(self) -> tuple[bool, str]:
        if self.fatal is not None:
            return False, f"failed to start: {self.fatal}"
        if self.client is None:
            return False, "loading model"
        if self.admission.draining:
            return False, "draining"
        if not self.client.healthy:
            return False, f"engine fault: {self.client.fault}"
        return True, "ready"

    def begin_drain(self) -> asyncio.Task:
        """Start draining (idempotent); the task ends when every request has ended."""
        if self._drain_task is None:
            self.admission.start_draining()
            self._drain_task = asyncio.ensure_future(self._drain())
        return self._drain_task

    async def _drain(self) -> None:
        timeout = self.settings.shutdown_timeout
        log.info("draining: %d requests in flight, up to %.0fs", self.admission.in_flight, timeout)
        if self.client is not None:
            await self.client.shutdown(timeout)
        # The engine has ended every stream; give the routes a moment to read them to the end.
        deadline = time.monotonic() + RESPONSE_FLUSH_S
        while self.open_streams > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        log.info("drained")

    async def close(self) -> None:
        await self.begin_drain()
