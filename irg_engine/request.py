"""One request's state across its stages, inside the engine.

A `Request` owns: its parameters, its recipe program (a generator, see `recipes/work.py`:
`start` builds it, `advance` feeds it results) and the item the program waits on, every KV
sequence it created (`RequestContexts`, freed together when the request ends, whatever the
reason), its events (through `emit`), its counters and timings. `RequestObserver` turns the
program's hook calls into the events of `events.py`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from irg_engine import events as ev
from irg_engine.block_pool import BlockPool, KVSequence
from irg_engine.recipes import program as recipe_program
from irg_engine.recipes.params import ImageOut, Observer, RecipeParams, TextOut
from irg_engine.recipes.work import Env, Program
from irg_engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from irg_engine.model.bagel import LoadedModel

log = logging.getLogger("irg_engine")


class RequestContexts:
    """The `Contexts` of one request: KV sequences in the shared pool, all tracked for freeing."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.owned: list[KVSequence] = []

    def _track(self, seq: KVSequence) -> KVSequence:
        self.owned.append(seq)
        return seq

    def new(self, name: str) -> KVSequence:
        return self._track(KVSequence(name))

    def fork(self, ctx: KVSequence, name: str) -> KVSequence:
        return self._track(ctx.fork(self.pool, name))

    def free(self, ctx: KVSequence) -> None:
        ctx.free(self.pool)

    def rope(self, ctx: KVSequence) -> int:
        return ctx.rope

    def free_all(self) -> None:
        for seq in self.owned:
            seq.free(self.pool)
        self.owned = []

    def growth(self, ctx: KVSequence, n: int) -> int:
        """Blocks this request holds more once ctx appends n tokens. Copying a shared last block
        adds one only where another of its own sequences keeps the original; where only others
        (the prefix cache, other requests) share it, the copy replaces it here."""
        _, shared = ctx.tail(self.pool)
        kept = shared and any(ctx.blocks[-1] in s.blocks for s in self.owned if s is not ctx)
        return ctx.blocks_needed(self.pool, n, copies=False) + kept

    def block_counts(self) -> tuple[int, int]:
        """Blocks of this request's contexts, each counted once (forks share theirs), and of
        those the ones held by this request alone: what a preemption would give back."""
        mine = Counter(b for s in self.owned for b in s.blocks)
        return len(mine), sum(1 for b, n in mine.items() if self.pool.refs[b] == n)


class RequestObserver(Observer):
    """Recipe hooks -> events, with streaming detokenisation and the request's counters."""

    def __init__(self, request: Request, tokenizer: Tokenizer, inner: Observer | None) -> None:
        self.request, self.tokenizer = request, tokenizer
        self.inner = inner or Observer()  # callers that also want the raw hooks (parity, tests)
        self.decoder = None

    def noise(self, round: int, default: torch.Tensor) -> torch.Tensor:
        return self.inner.noise(round, default)

    def feedback_pixels(self, round: int, pixels: np.ndarray) -> np.ndarray:
        return self.inner.feedback_pixels(round, pixels)

    def text_segment(self, context: str, ids: list[int], start: int) -> None:
        self.inner.text_segment(context, ids, start)

    def text_token(self, stage, round, token, position, logits) -> None:
        self.inner.text_token(stage, round, token, position, logits)
        r = self.request
        if token == self.tokenizer.im_start and self.decoder is None:
            self.decoder = self.tokenizer.incremental_decoder()
            return
        r.usage["generated_tokens"] += 1
        delta = self.decoder.push(token) if self.decoder else ""
        if delta:
            r.mark("first_text")
            r.emit(ev.TextDelta(stage, round, delta))

    def text_done(self, out: TextOut, generated: list[int]) -> None:
        self.inner.text_done(out, generated)
        tail = self.decoder.flush() if self.decoder else ""
        self.decoder = None
        if tail:
            self.request.emit(ev.TextDelta(out.stage, out.round, tail))
        self.request.texts.append({"stage": out.stage, "round": out.round, "text": out.text})
        self.request.emit(ev.TextDone(out.stage, out.round, out.text))

    def image_step(self, round, trace, total) -> None:
        self.inner.image_step(round, trace, total)
        self.request.usage["denoise_steps"] += 1
        self.request.emit(ev.ImageProgress(round, trace.index + 1, total))

    def image_partial(self, round: int, index: int, pixels: np.ndarray) -> None:
        self.inner.image_partial(round, index, pixels)
        self.request.emit(ev.ImagePartial(round, index, pixels))

    def image_done(self, round: int, tokens: torch.Tensor, decoded, out: ImageOut) -> None:
        self.inner.image_done(round, tokens, decoded, out)
        r = self.request
        r.mark("first_image")
        r.images.append({"round": round, "width": out.width, "height": out.height})
        r.emit(ev.ImageDone(round, out.pixels))


class Request:
    def __init__(
        self,
        request_id: str,
        params: RecipeParams,
        emit: Callable[[ev.Event], None],
        deadline: float | None = None,
        observer: Observer | None = None,
        program_factory: Callable[[Any], Program] | None = None,
    ) -> None:
        self.id, self.params, self._emit, self.deadline = request_id, params, emit, deadline
        # Internal callers (parity, tests, benchmarks) may watch the raw hooks or run a program
        # of their own instead of the recipe named by the parameters.
        self.observer, self.program_factory = observer, program_factory
        self.result: Any = None
        self.error: Exception | None = None  # what the program raised, where it ended so
        self.arrival = 0
        self.submitted = time.monotonic()
        self.program: Program | None = None
        self.pending: Any = None
        self.contexts: RequestContexts | None = None
        self.prefix_key: tuple[int, ...] | None = None
        self.texts: list[dict] = []
        self.images: list[dict] = []
        self.usage = {"prompt_tokens": 0, "generated_tokens": 0, "denoise_steps": 0}
        self.timings: dict[str, float] = {}
        self.finished = False
        self.started = False
        # A preempted program runs again from the start and emits the same events again: only
        # those past the ones already sent go out.
        self.program_events = 0  # emitted by the program's current run
        self.events_sent = 0  # program events the client has, over every run

    def emit(self, event: ev.Event) -> None:
        if self.finished:
            return
        if not isinstance(event, (ev.Queued, ev.Started, *ev.FINAL)):
            self.program_events += 1
            if self.program_events <= self.events_sent:
                return
            self.events_sent += 1
        self._emit(event)

    def start(self, model: LoadedModel, pool: BlockPool) -> None:
        """(Re)start the program on fresh contexts: the recipe's, or the caller's factory's."""
        if not self.started:
            self.started = True
            self.timings["queue"] = time.monotonic() - self.submitted
            self.emit(ev.Started(self.timings["queue"]))
        self.contexts = RequestContexts(pool)
        observer = RequestObserver(self, model.tokenizer, self.observer)
        env = Env(model.tokenizer, model.cfg, self.contexts, observer)
        factory = self.program_factory or (lambda env: recipe_program(self.params, env))
        self.program = factory(env)

    def advance(self, result: Any) -> ev.Event | None:
        """Send `result` into the program (None for its first item); `pending` is then what it
        waits on. Returns the final event when the program ended (its value, or its error)."""
        try:
            self.pending = self.program.send(result)
        except StopIteration as stop:
            self.result = stop.value
            return self.summary()
        except Exception as error:  # a bug or bad input ends this request only
            log.exception("request %s failed", self.id)
            self.error = error
            return ev.Failed("engine_error", f"{type(error).__name__}: {error}")
        return None

    def reset_for_recompute(self) -> None:
        """After a preemption: the program restarts from scratch (same seed, same outputs)."""
        if self.contexts is not None:
            self.contexts.free_all()
        self.program, self.pending, self.prefix_key = None, None, None
        self.program_events = 0
        self.texts, self.images = [], []
        self.usage = dict.fromkeys(self.usage, 0)

    def mark(self, name: str) -> None:
        self.timings.setdefault(name, time.monotonic() - self.submitted)

    def finish(self, event: ev.Event) -> None:
        """End the request: free every KV block it holds, send its final event once."""
        if self.finished:
            return
        if self.contexts is not None:
            self.contexts.free_all()
        self.program = None
        self.pending = None
        self.emit(event)
        self.finished = True

    def summary(self) -> ev.Finished:
        self.timings["total"] = time.monotonic() - self.submitted
        return ev.Finished(
            self.texts, self.images, self.params.seed, dict(self.timings), dict(self.usage)
        )
