"""The full-size benchmark's instruments: phases that report what they measured even when one
fails, timing with device syncs, profiler tables, per-stage clocks of a request, a tally of the
runner's steps by kind and the count of an IRG request's denoising passes (`bench/gpu_bench.py`
uses them)."""

from __future__ import annotations

import itertools
import json
import sys
import threading
import time
import traceback

import torch

from irg_engine import flow
from irg_engine.engine import Engine
from irg_engine.recipes.params import FIRST_IMAGE, REFINE_IMAGE, Observer, RecipeParams
from irg_engine.recipes.work import DecodeStep, Velocity
from irg_engine.runner import Scheduled


def run_phase(result: dict, name: str, fn, out: str | None) -> None:
    """Run one phase; a failure is recorded and the remaining phases still run."""
    t0 = time.perf_counter()
    print(f"[gpu_bench] {name} ...", file=sys.stderr, flush=True)
    try:
        with torch.no_grad():
            fn()
    except Exception as e:  # a benchmark reports every phase it can
        traceback.print_exc()
        result.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
    print(
        f"[gpu_bench] {name} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True
    )
    if out:  # written after every phase: a run cut short still leaves what it measured
        with open(out, "w") as f:
            json.dump(result, f, indent=2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat: int) -> float:
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeat


def write_profile(fn, device: torch.device, path: str | None) -> None:
    """One more call of fn under the profiler: its kernels by their own device time, to path."""
    if path is None:
        return
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        fn()
        sync(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70))


class StageClock(Observer):
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.marks: dict[str, float] = {}

    def text_done(self, out, generated) -> None:
        self.marks[f"{out.stage}{out.round}_done_s"] = time.perf_counter() - self.start

    def image_done(self, round, tokens, decoded, out) -> None:
        self.marks[f"image{round}_done_s"] = time.perf_counter() - self.start


def step_kind(batch: list[Scheduled]) -> str:
    """with_denoise, decode_only, or the other step's item kinds (e.g. `PrefillText+PrefillVit`)."""
    kinds = {type(s.item) for s in batch}
    if Velocity in kinds:
        return "with_denoise"
    if kinds == {DecodeStep}:
        return "decode_only"
    return "+".join(sorted(k.__name__ for k in kinds))


def tally_steps(engine: Engine) -> dict:
    """Seconds and counts of the runner's steps by kind, and of
    the image jobs beside them (`image_jobs`: wall time from a job's start until its kernels
    are done; on CUDA a worker's job runs on its own stream, after the steps queued before its
    submission and beside the later ones). Other steps are keyed by their item kinds.

    A step's seconds are the host's: a step waits for the device only where it reads decode
    tokens back, so the device time of steps that only queue work (denoising, prefill) lands
    on the next step or job that waits."""
    tally: dict = {}
    runner = engine.runner
    step = runner.step

    slowest: list[dict] = []  # the slowest steps, with their place in the run
    places = itertools.count(1)

    def timed_step(batch: list[Scheduled]) -> None:
        t0 = time.perf_counter()
        step(batch)
        seconds = time.perf_counter() - t0
        kind = step_kind(batch)
        entry = tally.setdefault(kind, {"steps": 0, "seconds": 0.0, "items": 0})
        entry["steps"] += 1
        entry["items"] += len(batch)
        entry["seconds"] += seconds
        place = next(places)
        slowest.append({"step": place, "kind": kind, "items": len(batch), "seconds": seconds})
        slowest.sort(key=lambda e: -e["seconds"])
        del slowest[SLOWEST:]

    jobs: dict = {}

    def timed_job(name: str, fn):
        def job(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            if out.is_cuda:  # this job's stream only: the steps run beside it on another
                torch.cuda.current_stream(out.device).synchronize()
            with lock:
                entry = jobs.setdefault(name, {"jobs": 0, "seconds": 0.0})
                entry["jobs"] += 1
                entry["seconds"] += time.perf_counter() - t0
            return out

        return job

    lock = threading.Lock()  # jobs run on the image workers' threads
    runner.step = timed_step
    runner.encode_latent = timed_job("encode_latent", runner.encode_latent)
    runner.decode_latents = timed_job("decode_latents", runner.decode_latents)
    tally["image_jobs"] = jobs
    tally["slowest"] = slowest
    return tally


SLOWEST = 6


def irg_passes(params: RecipeParams) -> dict[str, int]:
    """Denoising passes of one IRG request with one refine round, by the length of the context
    they attend to. Image 1's branches all have short contexts (text); image 2's conditional
    and text-free branches hold image 1's VAE and ViT blocks (long), its image-free one not."""
    short = long = 0
    for kind in (FIRST_IMAGE, REFINE_IMAGE):
        settings = params.image_settings(params.guidance(**kind))
        ts, _ = flow.schedule(settings.num_timesteps, settings.timestep_shift)
        for t in ts:
            text, img = flow.guidance_active(float(t), settings.guidance)
            if kind is FIRST_IMAGE:
                short += 1 + text + img
            else:
                long += 1 + text
                short += img
    return {"short_context": short, "long_context": long}
