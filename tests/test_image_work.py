"""ImageWork: jobs beside the step loop, the per-thread init, the count of busy workers, stealing;
and how the engine splits CPU threads between its loop and the image worker."""

import threading

import torch

from irg_engine.config import EngineConfig
from irg_engine.engine import Engine
from irg_engine.image_work import ImageWork
from irg_engine.recipes import RecipeParams
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
        seen.append((torch.get_num_threads(), engine.images.workers_busy))
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
