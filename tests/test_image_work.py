"""ImageWork: jobs beside the step loop, the per-thread init, the count of busy workers, stealing;
how the engine splits CPU threads between its loop and the image worker; and the image lane's
device policy (the loop helps on the CPU; on CUDA jobs run on a worker's stream, ordered after
the loop's work before them and not behind its work after them)."""

import gc
import threading
import time
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from irg_engine.config import EngineConfig
from irg_engine.engine import Engine
from irg_engine.image_lane import ImageLane
from irg_engine.image_work import ImageWork
from irg_engine.recipes import RecipeParams
from irg_engine.recipes.work import DecodeLatents, EncodeLatent
from irg_engine.request import Request


def test_worker_runs_init_and_counts_the_job_it_runs():
    inits, started, release = [], threading.Event(), threading.Event()

    def job():
        started.set()
        assert release.wait(5)
        return threading.current_thread().name

    work = ImageWork(1, lambda: inits.append(threading.current_thread().name))
    try:
        work.submit("a", "program-a", job)
        assert started.wait(5)
        state = (work.workers_busy, work.queued, work.in_flight, work.busy("a"))
        assert state == (1, 0, True, True)
        release.set()
        done = []
        while not done:
            work.wait(1)
            done = work.finished()
        (finished,) = done
        assert (finished.request_id, finished.program) == ("a", "program-a")
        assert finished.result == "irg-image-0" and finished.error is None
        assert inits == ["irg-image-0"]
        assert (work.workers_busy, work.in_flight, work.busy("a")) == (0, False, False)
    finally:
        work.close()


def test_steal_runs_a_queued_job_in_the_caller_and_errors_come_back():
    gate = threading.Event()
    work = ImageWork(1)
    try:
        work.submit("blocker", None, gate.wait, 5)  # keeps the only worker busy
        work.submit("b", None, lambda: 1 / 0)
        while work.queued != 1:
            work.wait(0.01)
        assert work.workers_busy == 1  # one worker, running the blocker
        assert work.steal() and not work.steal()
        assert work.workers_busy == 1  # the stolen job ran here, not on a worker
        gate.set()
        jobs = {}
        while len(jobs) < 2:
            work.wait(1)
            jobs.update({j.request_id: j for j in work.finished()})
        assert isinstance(jobs["b"].error, ZeroDivisionError)
        assert jobs["blocker"].result is True
    finally:
        work.close()


def test_engine_loop_takes_the_cores_no_image_job_holds(tiny_model, monkeypatch):
    engine = Engine(tiny_model, EngineConfig(cpu_threads=2))
    seen = []
    step = engine.runner.step

    def recording(batch):
        seen.append((torch.get_num_threads(), engine.images.work.workers_busy))
        step(batch)

    monkeypatch.setattr(engine.runner, "step", recording)
    params = RecipeParams("a fox", width=32, height=32, num_timesteps=3, max_think_tokens=4)
    engine.add(Request("0", params, lambda event: None))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine.run_until_idle()
        assert torch.get_num_threads() == 1  # the caller's own setting comes back
    finally:
        torch.set_num_threads(before)
        engine.close()
    assert (2, 0) in seen  # alone, the loop's ops got both threads
    assert all(threads in (1, 2) for threads, _ in seen)


def _finished(lane: ImageLane, within: float = 30) -> list:
    deadline, done = time.monotonic() + within, []
    while not done:
        assert time.monotonic() < deadline, "no image job finished"
        lane.wait(0.1)
        done = lane.finished()
    return done


def test_lane_on_cpu_decodes_beside_the_loop_and_lends_the_loop_queued_jobs(tiny_model):
    engine = Engine(tiny_model, EngineConfig(cpu_threads=2))
    lane = engine.images
    grid = (2, 2)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    try:
        lane.submit("r", "p", DecodeLatents(x, grid))
        lane.submit("r", "p", DecodeLatents(x, grid))  # one job per request at a time
        (job,) = _finished(lane)
        assert job.error is None
        assert torch.equal(job.result, engine.runner.decode_latents(x, grid))
        gate = threading.Event()
        lane.work.submit("blocker", None, gate.wait, 5)  # keeps the only worker busy
        lane.submit("s", "q", DecodeLatents(x, grid))
        while lane.work.queued != 1:
            lane.wait(0.01)
        assert lane.help_before_step()  # on the CPU the loop runs the queued job itself
        gate.set()
        assert not lane.help_before_step()
    finally:
        engine.close()


@pytest.mark.gpu
def test_lane_jobs_on_cuda_wait_for_the_loops_stream_and_not_for_later_steps(tiny_dir):
    """A worker's stream waits for the kernels the loop queued before `submit` (here: ~0.5 s of
    sleep, then the write of the latents), and not for those queued after it."""
    from irg_engine import checkpoint

    model = checkpoint.load(tiny_dir, "cuda", dtype=torch.float32)
    engine = Engine(model, EngineConfig())
    lane, grid = engine.images, (2, 2)
    target = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)).cuda()
    image = Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8))
    try:
        expected = engine.runner.decode_latents(target, grid)
        encoded = engine.runner.encode_latent(image)
        for item in (DecodeLatents(target, grid), EncodeLatent(image)):  # the worker's set-up
            lane.submit("warm", "w", item)
            (warm,) = _finished(lane)
            assert warm.error is None
        x = torch.zeros_like(target)
        torch.cuda._sleep(1_000_000_000)
        x.copy_(target)
        assert not lane.help_before_step()  # on CUDA the loop never waits on a job this way
        lane.submit("r", "p", DecodeLatents(x, grid))
        lane.submit("s", "q", EncodeLatent(image))
        torch.cuda._sleep(4_000_000_000)  # a long step launched after the jobs
        t0 = time.perf_counter()
        jobs = {}
        while len(jobs) < 2:
            jobs.update({j.request_id: j for j in _finished(lane)})
        assert time.perf_counter() - t0 < 1.5  # done long before the ~2 s of later work
        assert torch.equal(jobs["r"].result, expected)
        assert torch.equal(jobs["s"].result, encoded)
    finally:
        torch.cuda.synchronize()
        engine.close()


def test_an_idle_worker_holds_no_finished_job():
    """A job's program and result are the request's: once handed back, nothing here keeps them."""

    class Result:
        pass

    work = ImageWork(1)
    made = []

    def job():
        made.append(result := Result())
        return result

    work.submit("r", object(), job)
    while not (done := work.finished()):
        work.wait(0.05)
    gone = weakref.ref(made.pop())
    del done
    time.sleep(0.1)  # the worker is back waiting for the next job
    gc.collect()
    assert gone() is None
    work.close()
