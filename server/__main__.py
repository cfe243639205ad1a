"""`irg-server` / `python -m server`: parse the settings, build the app, serve it with uvicorn.

Signals: the first SIGTERM or SIGINT starts a drain instead of uvicorn's immediate shutdown:
/ready and new requests answer 503, in-flight requests get up to `--shutdown-timeout` seconds to
finish, the engine ends the rest with an `error` event, and then uvicorn stops and the process
exits 0. A second signal stops at once (open streams are cut; exit 0). A model that cannot be
loaded exits 1. A signal during the model load exits at once, leaving the load unfinished.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

import uvicorn

from irg_engine.client import ENGINE_THREAD
from irg_engine.image_work import IMAGE_THREAD
from server.app import create_app
from server.http_protocol import uvicorn_config
from server.settings import Settings, parse_settings
from server.state import LOAD_THREAD

log = logging.getLogger("irg.server")
# Threads that may be inside torch when serving stops: the model load, the engine's step loop and
# its image workers.
WORKER_THREADS = (LOAD_THREAD, ENGINE_THREAD, IMAGE_THREAD)


class DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM meaning "drain, then exit" (its default closes the socket first)."""

    def __init__(self, config: uvicorn.Config, settings: Settings) -> None:
        super().__init__(config)
        self.settings = settings
        self.exit_code = 0
        self.signalled = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def fail(self) -> None:
        self.exit_code = 1
        self.should_exit = True

    def handle_exit(self, sig: int, frame) -> None:
        # Signals are not recorded as captured, so uvicorn does not re-raise them after serving
        # and the exit code stays ours.
        state = self.config.app.state.irg
        # `signalled`, not the drain's own flag: the loop sets that only when it runs, and a
        # second signal must count while the loop is busy (blocked on a full stderr pipe, say).
        if self.signalled or state.admission.draining or self.should_exit:
            # A second signal: stop now. Not through uvicorn's forced exit, whose cancelled
            # lifespan and request tasks each log a traceback at ERROR.
            log.info("received %s again: exiting now", signal.Signals(sig).name)
            exit_now(self.exit_code)
        self.signalled = True
        if self._loop is None:
            self.should_exit = True  # not serving yet: nothing to drain
            return
        log.info("received %s: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._drain, state)

    def _drain(self, state) -> None:
        task = state.begin_drain()
        task.add_done_callback(lambda _: setattr(self, "should_exit", True))


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    server: DrainingServer | None = None

    def on_fatal() -> None:
        if server is not None:
            server.fail()

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn_config(
        app, settings, log_level=settings.log_level, timeout_graceful_shutdown=5
    )
    server = DrainingServer(config, settings)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn's own exit (a port in use, a failed startup)
        server.exit_code = exc.code if isinstance(exc.code, int) else 1
    busy = [t.name for t in threading.enumerate() if t.name.startswith(WORKER_THREADS)]
    if busy:
        # Stopped with a worker still inside torch (the model load, say): at interpreter exit it
        # would be ended inside torch's C++ code, which aborts the process (SIGABRT instead of
        # our exit code).
        log.info("exiting with %s still running", ", ".join(busy))
        exit_now(server.exit_code)
    return server.exit_code


def exit_now(code: int) -> None:
    """End the process at once with `code`, logs and output flushed; threads inside torch are
    not joined (the OS closes the sockets: open streams are cut)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
