"""VAE encodes and decodes of running requests, done beside the engine's step loop.

They need no shared forward, and at the published resize rules (an IRG image is re-encoded at
>= 512 px) they can take longer than many engine steps, so they run on worker threads while the
loop keeps batching everyone else. The loop may also run a job no worker has taken yet
(`steal`); when it does is the image lane's policy (`image_lane.py`).

Workers run `thread_init` first (the image lane gives each one CPU thread for torch ops and, on
CUDA, a stream of its own); `workers_busy` counts those running a job or about to take one, so
the loop can take the remaining cores.

Flow: `submit(request id, program, fn, args)` queues a job; workers (and `steal`) run jobs;
`finished()` hands back (request id, program, result or exception) for the engine to deliver.
The program is returned with the result so the engine can drop results of requests that were
restarted or ended meanwhile.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
IMAGE_THREAD = "irg-image"  # worker i is named f"{IMAGE_THREAD}-{i}"


@dataclass
class Job:
    request_id: str
    program: Any
    fn: Callable[..., Any]
    args: tuple
    result: Any = None
    error: BaseException | None = None


class ImageWork:
    def __init__(self, workers: int, thread_init: Callable[[], None] | None = None) -> None:
        self._queue: deque[Job] = deque()
        self._done: list[Job] = []
        self._pending: set[str] = set()
        self._cond = threading.Condition()
        self._closed = False
        self._working = 0
        self._thread_init = thread_init
        self._threads = [
            threading.Thread(target=self._work, name=f"{IMAGE_THREAD}-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, request_id: str, program: Any, fn: Callable[..., Any], *args: Any) -> None:
        with self._cond:
            self._pending.add(request_id)
            self._queue.append(Job(request_id, program, fn, args))
            self._cond.notify_all()

    def busy(self, request_id: str) -> bool:
        with self._cond:
            return request_id in self._pending

    @property
    def queued(self) -> int:
        """Jobs no thread has started yet."""
        with self._cond:
            return len(self._queue)

    @property
    def workers_busy(self) -> int:
        """Worker threads running a job or about to take a queued one."""
        with self._cond:
            return min(len(self._threads), self._working + len(self._queue))

    @property
    def in_flight(self) -> bool:
        with self._cond:
            return bool(self._pending)

    def finished(self) -> list[Job]:
        with self._cond:
            done, self._done = self._done, []
            for job in done:
                self._pending.discard(job.request_id)
            return done

    def steal(self) -> bool:
        """Run the next queued job in the calling thread; False when none is queued."""
        with self._cond:
            if not self._queue:
                return False
            job = self._queue.popleft()
        self._run(job)
        return True

    def wait(self, timeout: float) -> None:
        """Until some job finishes (or the timeout passes)."""
        with self._cond:
            if not self._done:
                self._cond.wait(timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=30)

    def _work(self) -> None:
        if self._thread_init is not None:
            try:
                self._thread_init()
            except Exception:  # a worker without its settings still runs jobs correctly
                log.exception("image worker set-up failed; it runs jobs without it")
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._queue.popleft()
                self._working += 1
            self._run(job)
            del job  # else it holds the request's program and result until the next job comes
            with self._cond:
                self._working -= 1

    def _run(self, job: Job) -> None:
        try:
            job.result = job.fn(*job.args)
        except Exception as error:  # delivered to the request's program owner, not raised here
            job.error = error
        with self._cond:
            self._done.append(job)
            self._cond.notify_all()
