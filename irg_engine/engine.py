"""The engine's step loop: admits requests, forms each step, runs it, advances every program.

Data flow of one `step()`:
1. aborts and deadlines end their requests (their KV blocks are freed at once);
2. waiting requests are admitted up to `max_running`; each gets its recipe program;
3. each running program is advanced past work that needs no shared forward (VAE encode/decode,
   a system prompt found in the prefix cache) until it waits on model work;
4. the `Scheduler` picks what runs under the token budget and the free KV blocks; the `Runner`
   packs it into one forward. When nothing fits, `_make_room` ends what never could, drops a
   cached prefix, preempts a younger request or waits for image jobs;
5. results go back into the programs; finished programs end their requests.
A forward that raises is retried item by item, so a fault that belongs to one request ends only
that request; when every item fails the engine records a fault until a step or a probe succeeds
(`step_guard.py`); an error in one request's handling outside the forward ends that request
(`_guarded`). `client.py` wraps this loop in a thread with an asyncio interface.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from irg_engine import events as ev
from irg_engine.attention import resolve_backend
from irg_engine.block_pool import BlockPool, blocks_for
from irg_engine.config import EngineConfig, EngineStats
from irg_engine.image_lane import ImageLane
from irg_engine.model.bagel import LoadedModel
from irg_engine.prefix_cache import PrefixCache
from irg_engine.recipes.work import (
    LM_WORK,
    DecodeLatents,
    DecodeStep,
    EncodeLatent,
    NonFiniteLogits,
    PrefillText,
    ReadKV,
    Velocity,
)
from irg_engine.request import Request
from irg_engine.runner import Runner, Scheduled, auto_kv_tokens
from irg_engine.sampler import NO_TOKEN
from irg_engine.scheduler import Pending, Scheduler
from irg_engine.step_guard import StepGuard

log = logging.getLogger("irg_engine")
T = TypeVar("T")


class Engine:
    def __init__(self, model: LoadedModel, config: EngineConfig | None = None) -> None:
        self.model, self.config = model, config or EngineConfig()
        cfg = self.config
        kv_tokens = cfg.kv_tokens or auto_kv_tokens(model)
        self.pool = BlockPool(blocks_for(kv_tokens, cfg.block_size), cfg.block_size)
        self.runner = Runner(
            model,
            self.pool,
            resolve_backend(cfg.attention_backend),
            cfg.decode_graphs,
            max_batch=cfg.max_running,
            decode_ahead=cfg.decode_ahead,
        )
        self.guard = StepGuard(self.runner, self.pool)
        self.scheduler = Scheduler(cfg.token_budget, cfg.block_size)
        self.prefix_cache = PrefixCache(self.pool, cfg.prefix_cache_entries)
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self._aborts: set[str] = set()
        self._arrivals = 0
        self.steps = self.tokens_decoded = self.denoise_steps = self.preemptions = 0
        self.accepting = True
        self.images = ImageLane(
            self.runner, cfg.image_workers, cfg.cpu_threads or torch.get_num_threads()
        )

    # -- thread-safe entry points -------------------------------------------------------------
    def add(self, request: Request) -> None:
        with self.lock:
            if not self.accepting:
                raise RuntimeError(self.guard.fault or "engine is shutting down")
            if len(self.waiting) >= self.config.max_waiting:
                raise OverflowError(f"queue full ({self.config.max_waiting} waiting)")
            self._arrivals += 1
            request.arrival = self._arrivals
            self.waiting.append(request)
            request.emit(ev.Queued(len(self.waiting) - 1))
            self.wake.notify()

    def abort(self, request_id: str) -> bool:
        with self.lock:
            known = request_id in self.running or any(r.id == request_id for r in self.waiting)
            if known:
                self._aborts.add(request_id)
                self.wake.notify()
            return known

    def stats(self) -> EngineStats:
        with self.lock:
            return EngineStats(
                len(self.running),
                len(self.waiting),
                self.pool.num_used,
                self.pool.num_blocks,
                self.steps,
                self.tokens_decoded,
                self.denoise_steps,
                self.guard.healthy,
                self.guard.fault,
            )

    @property
    def idle(self) -> bool:
        with self.lock:
            return not self.running and not self.waiting

    # -- the loop -----------------------------------------------------------------------------
    def step(self) -> bool:
        """One iteration; returns False when there was nothing to do."""
        self._end_aborted_and_late()
        self._admit()
        self._collect_aux()
        for req in list(self.running.values()):
            self._guarded(req, self._advance_inline, req)
        live = [r for r in self.running.values() if isinstance(r.pending, LM_WORK)]
        if live and self.images.help_before_step():
            return True
        pending = [(r, p) for r in live if (p := self._guarded(r, self._pending, r)) is not None]
        if not pending:
            self.guard.probe()
            self.images.help_while_idle()
            return bool(self.running)
        live, pending = [r for r, _ in pending], [p for _, p in pending]
        plan = self.scheduler.plan(pending, self.pool.num_free)
        if not plan.run:
            self._make_room(live, pending)
            return True
        batch = [
            (self.running[rid], Scheduled(self.running[rid].pending, n)) for rid, n in plan.run
        ]
        self.images.take_cores()
        self._run_batch(batch)
        return True

    def _make_room(self, live: list[Request], pending: list[Pending]) -> None:
        """Nothing fits in the free KV blocks. In order: end the requests that could not run
        even with the whole pool; drop a cached prefix (only a shortcut); preempt a request
        younger than the oldest (`Scheduler.victim`); wait for image jobs, whose requests may
        free theirs."""
        pool, too_big = self.pool, []
        for p, r in zip(pending, live, strict=True):
            p.holds_blocks, p.frees_blocks = r.contexts.block_counts()
            item = r.pending
            grows = 0 if isinstance(item, Velocity) else r.contexts.growth(item.ctx, item.tokens)
            if p.holds_blocks + grows > pool.num_blocks:
                too_big.append(r)
        size = f"{pool.num_blocks} blocks of {pool.block_size} tokens"
        for r in too_big:
            self._finish(
                r, ev.Failed("invalid_request", f"request does not fit in the KV cache ({size})")
            )
        if too_big:
            return
        if self.prefix_cache.give_back():
            return
        if (victim := self.scheduler.victim(pending)) is not None:
            self._preempt(self.running[victim])
        elif self.images.in_flight:
            self.images.wait(0.05)
        else:  # every block is held by the requests here and none can go: never hang
            for r in live:
                self._finish(r, ev.Failed("engine_error", "the KV cache is full and stuck"))

    def _pending(self, req: Request) -> Pending:
        """What the scheduler sees of a request's model work (a denoising step writes no KV)."""
        item = req.pending
        if isinstance(item, Velocity):
            return Pending(req.id, item.kind, item.tokens, 0, req.arrival)
        room, shared = item.ctx.tail(self.pool)
        blocks = item.ctx.blocks_needed(self.pool, item.tokens)
        return Pending(
            req.id, item.kind, item.tokens, blocks, req.arrival, room=room, copy=int(shared)
        )

    def _run_batch(self, batch: list[tuple[Request, Scheduled]]) -> None:
        """Run the step through the guard (`step_guard.py`): only the requests whose items fail
        end."""
        errors = self.guard.run([sch for _, sch in batch])
        self.steps += 1
        for (req, _), error in zip(batch, errors, strict=True):
            if error is not None:
                self._finish(req, ev.Failed("engine_error", f"model error: {error}"))
        for (req, sch), error in zip(batch, errors, strict=True):
            if error is None:
                self._guarded(req, self._deliver, req, sch)

    def _deliver(self, req: Request, sch: Scheduled) -> None:
        item = sch.item
        if isinstance(item, DecodeStep):
            self.tokens_decoded += 1
            if sch.result.token != NO_TOKEN:
                self.guard.token_drawn()
        elif isinstance(item, Velocity):
            self.denoise_steps += 1
        elif isinstance(item, PrefillText):
            req.usage["prompt_tokens"] += sch.tokens
            if sch.tokens < len(item.ids):  # a chunk: the rest stays pending
                item.ids = item.ids[sch.tokens :]
                return
            if req.prefix_key is not None:
                self.prefix_cache.store(req.prefix_key, item.ctx)
                req.prefix_key = None
        self._send(req, sch.result)

    # -- programs -----------------------------------------------------------------------------
    def _admit(self) -> None:
        with self.lock:
            while self.waiting and len(self.running) < self.config.max_running:
                req = self.waiting.popleft()
                self.running[req.id] = req
        for req in list(self.running.values()):  # a program may end on its first advance
            if req.program is None and not req.finished:
                self._guarded(req, self._start, req)

    def _guarded(self, req: Request, fn: Callable[..., T], *args: Any) -> T | None:
        """`fn(*args)` on one request's behalf: an error there (an engine bug met by this
        request's state, e.g. a malformed work item) ends that request alone."""
        try:
            return fn(*args)
        except Exception as error:
            log.exception("request %s failed in the engine", req.id)
            # Flagged as a step's fault is (cleared by the next good step or probe), so a fault
            # that every request meets here shows on /ready.
            self.guard.flag(f"{type(error).__name__}: {error}")
            self._finish(req, ev.Failed("engine_error", self.guard.fault))
            return None

    def _start(self, req: Request) -> None:
        req.start(self.model, self.pool)
        self._send(req, None)

    def _send(self, req: Request, result) -> None:
        if (end := req.advance(result)) is not None:
            if isinstance(req.error, NonFiniteLogits):
                # The model's numbers more likely than the request's: flagged until a decode
                # row (or the probe) draws a real token (`step_guard.py`).
                self.guard.flag(f"{type(req.error).__name__}: {req.error}", numbers=True)
            self._finish(req, end)

    def _advance_inline(self, req: Request) -> None:
        """Advance the program past work that needs no shared forward.

        VAE encodes and decodes go to the image lane (`image_lane.py`), so the step loop keeps
        batching everyone else's model work meanwhile; the program resumes when `_collect_aux`
        finds the result.
        """
        while isinstance(req.pending, ReadKV):
            self._send(req, self.runner.read_kv(req.pending.ctx))
        item = req.pending
        if isinstance(item, (EncodeLatent, DecodeLatents)):
            self.images.submit(req.id, req.program, item)
            return
        if isinstance(item, PrefillText) and item.shared and item.ctx.length == 0:
            key = tuple(item.ids)
            if not self.prefix_cache.adopt(key, item.ctx):
                req.prefix_key = key
                return
            # Adopted, perhaps after missing it on an earlier pass: the cache holds it, so this
            # request has nothing to store (its own next prefill is not the prefix).
            req.prefix_key = None
            req.usage["prompt_tokens"] += len(item.ids)
            self._send(req, None)
            self._advance_inline(req)

    def _collect_aux(self) -> None:
        for job in self.images.finished():
            req = self.running.get(job.request_id)
            if req is None or req.program is not job.program:  # ended or restarted meanwhile
                continue
            if job.error is not None:
                log.error("request %s failed in image work: %r", req.id, job.error)
                error = job.error
                self._finish(req, ev.Failed("engine_error", f"{type(error).__name__}: {error}"))
                continue
            self._send(req, job.result)

    def close(self) -> None:
        self.images.close()

    def clear_prefix_cache(self) -> None:
        self.prefix_cache.clear()

    # -- endings ------------------------------------------------------------------------------
    def _preempt(self, req: Request) -> None:
        log.info("preempting request %s (KV pool full); it will be recomputed", req.id)
        self.preemptions += 1
        req.reset_for_recompute()

    def _finish(self, req: Request, event: ev.Event) -> None:
        # Leave the running set before the final event goes out: whoever reads it then sees
        # stats without this request.
        with self.lock:
            self.running.pop(req.id, None)
        req.finish(event)

    def _end_aborted_and_late(self) -> None:
        now = time.monotonic()
        with self.lock:
            aborts, self._aborts = self._aborts, set()
            everyone = list(self.running.values()) + list(self.waiting)
        for req in everyone:
            if req.id in aborts:
                event = ev.Failed("aborted", "request aborted")
            elif req.deadline is not None and now > req.deadline:
                event = ev.Failed("timeout", "request deadline exceeded")
            else:
                continue
            with self.lock:
                if req in self.waiting:
                    self.waiting.remove(req)
            self._finish(req, event)

    def fail_all(self, code: str, message: str) -> None:
        with self.lock:
            everyone = list(self.running.values()) + list(self.waiting)
            self.waiting.clear()
        for req in everyone:
            self._finish(req, ev.Failed(code, message))

    def run_until_idle(self) -> None:
        """Step in the calling thread until every request has ended (tests, benchmarks)."""
        threads = torch.get_num_threads()
        try:
            while not self.idle:
                self.step()
        finally:  # the steps re-split the cores; hand the caller back its own setting
            torch.set_num_threads(threads)
