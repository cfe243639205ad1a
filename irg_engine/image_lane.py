"""Requests' VAE work beside the step loop, and how it shares the machine with that loop.

The engine hands over a request's `EncodeLatent` or `DecodeLatents` (`submit`); `ImageWork`
threads run it through the runner while the loop keeps batching everyone else's model work, and
`finished()` hands the results back for the engine to deliver.

What is scarce differs by device, and so does the policy:
- CPU: cores. A worker runs its job on one thread and the loop's torch ops take the rest
  (`take_cores`). A job no worker has started is run by the loop itself before its next step
  (`help_before_step`): the requests behind it rejoin sooner and in step with the rest, so their
  next phase batches with everyone instead of trailing alone (in-process A/B, 8 IRG requests on
  2 cores: 11.5 s and 558 steps vs 12.2 s and ~630 steps when only a backlog of half the
  requests did).
- CUDA: the loop's place in the GPU queue. A job the loop ran would queue behind the steps it
  had launched, and its copy back would hold the loop until all of them ran, so the GPU would
  idle while the next step was built. Workers queue their kernels on a stream of their own
  instead: a VAE decode runs beside the denoising steps, its copy back waits for the VAE alone,
  and the loop runs a job only when it has no model work to launch.

Order across streams: a job's input (the latents of a denoising stage) comes from kernels the
loop queued on its stream, so `submit` records an event there and the worker's stream waits on
it first. A result left on the GPU (an encoded latent) is complete before the loop sees it, and
`record_stream` keeps the allocator from giving its memory to a later job while kernels the loop
queues still read it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from irg_engine.image_work import ImageWork, Job
from irg_engine.recipes.work import DecodeLatents, EncodeLatent
from irg_engine.runner import Runner


class ImageLane:
    def __init__(self, runner: Runner, workers: int, cpu_threads: int) -> None:
        self.runner, self.cpu_threads = runner, cpu_threads
        self.device = runner.device
        self.cuda = self.device.type == "cuda"
        self.work = ImageWork(workers, self._worker_init)

    def _worker_init(self) -> None:
        torch.set_num_threads(1)
        if self.cuda:
            torch.cuda.set_device(self.device)
            # From the high-priority pool: torch hands out pooled streams round robin, and the
            # decode graphs capture on a normal-priority one, so after enough draws a worker could
            # share the capture stream and its kernels would land in a graph. A job's requests
            # wait on it, so it may as well go first where it overlaps a step.
            torch.cuda.set_stream(torch.cuda.Stream(self.device, priority=-1))

    def submit(self, request_id: str, program: Any, item: EncodeLatent | DecodeLatents) -> None:
        """Queue the item's VAE work, once: the loop's thread calls this on every pass while the
        item waits, and a request with a job in flight or undelivered adds nothing."""
        if self.work.busy(request_id):
            return
        if isinstance(item, EncodeLatent):
            fn, args = self.runner.encode_latent, (item.image,)
        else:
            fn, args = self.runner.decode_latents, (item.x, item.grid)
        loop = torch.cuda.current_stream(self.device) if self.cuda else None
        ready = loop.record_event() if loop is not None else None
        self.work.submit(request_id, program, self._run, loop, ready, fn, *args)

    def _run(
        self,
        loop: torch.cuda.Stream | None,
        ready: torch.cuda.Event | None,
        fn: Callable[..., Any],
        *args: Any,
    ) -> Any:
        if loop is None:
            return fn(*args)
        here = torch.cuda.current_stream(self.device)
        if here == loop:  # run by the loop itself: its own queue orders everything
            return fn(*args)
        here.wait_event(ready)
        out = fn(*args)
        if isinstance(out, torch.Tensor) and out.is_cuda:
            out.record_stream(loop)
            here.synchronize()
        return out

    # -- the loop's side ----------------------------------------------------------------------
    def help_before_step(self) -> bool:
        """With model work waiting: run a queued job first where that pays (the CPU; see the
        module docstring). True if one ran."""
        if self.cuda or not self.work.queued:
            return False
        self.take_cores()
        return self.work.steal()

    def help_while_idle(self) -> None:
        """No model work: run a queued job here, or wait a little for a running one."""
        self.take_cores()
        if self.work.in_flight and not self.work.steal():
            self.work.wait(0.05)

    def take_cores(self) -> None:
        """The loop's torch ops get the CPU threads no image worker holds or is about to.

        lm_head and sampling over the vocabulary split well over threads; an image worker runs
        one. Set before each use: a worker's own setting also moves MKL's process-wide count.
        """
        torch.set_num_threads(max(1, self.cpu_threads - self.work.workers_busy))

    def finished(self) -> list[Job]:
        return self.work.finished()

    @property
    def in_flight(self) -> bool:
        return self.work.in_flight

    def wait(self, timeout: float) -> None:
        self.work.wait(timeout)

    def close(self) -> None:
        self.work.close()
