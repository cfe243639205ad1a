"""Engine benchmark: the batched engine against the sequential reference, in the same run.

    python bench/engine_bench.py --preset tiny --concurrency 8 [--json]
    python bench/engine_bench.py --preset bagel-7b --random-weights   (GPU; see bench/gpu_bench.py)

The tiny preset runs the same IRG requests (same seeds, same settings) twice: one after another
through the reference recipes, then all at once through the engine, and reports throughput,
latency percentiles and `speedup_vs_sequential`. With `--repeat N` the two halves alternate N
times and the times are medians (a shared VM's slow spells move single runs by 10-20%). Both
sides get the same CPU threads (`--threads`, all cores by default): the sequential run as torch's
thread count, the engine as its `cpu_threads`, which its loop and image worker share. With
`--json` stdout holds one JSON object and nothing else (the table goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from irg_engine import checkpoint, events
from irg_engine.config import EngineConfig
from irg_engine.engine import Engine
from irg_engine.recipes import RecipeParams, run
from irg_engine.request import Request
from irg_engine.tiny import write_tiny


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def requests(args: argparse.Namespace) -> list[RecipeParams]:
    return [
        RecipeParams(
            f"bench prompt {i}: a small red boat on a calm lake",
            recipe=args.recipe,
            seed=i,
            width=args.size,
            height=args.size,
            num_timesteps=args.timesteps,
            max_think_tokens=args.think_tokens,
            temperature=args.temperature,
        )
        for i in range(args.requests or args.concurrency)
    ]


def run_sequential(model, params: list[RecipeParams]) -> tuple[float, list[float]]:
    latencies = []
    start = time.perf_counter()
    for p in params:
        t0 = time.perf_counter()
        run(model, p)
        latencies.append(time.perf_counter() - t0)
    return time.perf_counter() - start, latencies


def run_engine(
    model, params: list[RecipeParams], concurrency: int, image_workers: int = 1, threads: int = 0
) -> tuple[float, list[float], dict]:
    config = EngineConfig(max_running=concurrency, image_workers=image_workers, cpu_threads=threads)
    engine = Engine(model, config)
    done: dict[str, float] = {}
    failures = []

    def sink(rid: str):
        def emit(event):
            if isinstance(event, events.Finished):
                done[rid] = time.perf_counter()
            elif isinstance(event, events.Failed):
                failures.append(event.message)

        return emit

    start = time.perf_counter()
    for i, p in enumerate(params):
        engine.add(Request(str(i), p, sink(str(i))))
    with torch.no_grad():
        engine.run_until_idle()
    total = time.perf_counter() - start
    engine.close()
    if failures:
        raise RuntimeError(f"engine requests failed: {failures[:3]}")
    stats = engine.stats()
    return (
        total,
        [t - start for t in done.values()],
        {
            "engine_steps": stats.steps,
            "tokens_decoded": stats.tokens_decoded,
            "denoise_evaluations": stats.denoise_steps,
        },
    )


def tiny_bench(args: argparse.Namespace) -> dict:
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = checkpoint.load(write_tiny(Path(tmp) / "tiny"))
    params = requests(args)
    run(model, RecipeParams("warm-up", width=32, height=32, num_timesteps=2, max_think_tokens=2))
    # The halves alternate, so a slow spell of a shared machine falls on both.
    seq_runs, eng_runs = [], []
    for _ in range(args.repeat):
        seq_runs.append(run_sequential(model, params))
        eng_runs.append(run_engine(model, params, args.concurrency, args.image_workers, threads))
    seq_total = statistics.median(total for total, _ in seq_runs)
    eng_total = statistics.median(total for total, _, _ in eng_runs)
    seq_lat = [t for _, lat in seq_runs for t in lat]
    eng_lat = [t for _, lat, _ in eng_runs for t in lat]
    n = len(params)
    return {
        "preset": "tiny",
        "recipe": args.recipe,
        "requests": n,
        "concurrency": args.concurrency,
        "size": args.size,
        "timesteps": args.timesteps,
        "think_tokens": args.think_tokens,
        "threads": threads,
        "image_workers": args.image_workers,
        "repeat": args.repeat,
        "sequential_s": round(seq_total, 3),
        "engine_s": round(eng_total, 3),
        "sequential_requests_per_s": round(n / seq_total, 4),
        "engine_requests_per_s": round(n / eng_total, 4),
        "speedup_vs_sequential": round(seq_total / eng_total, 3),
        "speedup_each_repeat": [
            round(s[0] / e[0], 3) for s, e in zip(seq_runs, eng_runs, strict=True)
        ],
        "sequential_p50_s": round(statistics.median(seq_lat), 3),
        "sequential_p99_s": round(percentile(seq_lat, 99), 3),
        "engine_p50_s": round(statistics.median(eng_lat), 3),
        "engine_p99_s": round(percentile(eng_lat, 99), 3),
        **eng_runs[-1][2],
    }


def table(result: dict) -> str:
    rows = [
        (
            "throughput (req/s)",
            result["sequential_requests_per_s"],
            result["engine_requests_per_s"],
        ),
        ("p50 latency (s)", result["sequential_p50_s"], result["engine_p50_s"]),
        ("p99 latency (s)", result["sequential_p99_s"], result["engine_p99_s"]),
        ("wall time (s)", result["sequential_s"], result["engine_s"]),
    ]
    lines = [
        f"{result['requests']} {result['recipe']} requests, {result['size']}px, "
        f"{result['timesteps']} timesteps, thinks <= {result['think_tokens']} tokens",
        f"{'':22s}{'sequential':>12s}{'engine':>12s}",
    ]
    lines += [f"{name:22s}{a:>12}{b:>12}" for name, a, b in rows]
    lines.append(f"speedup_vs_sequential: {result['speedup_vs_sequential']}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=["tiny", "bagel-7b"], default="tiny")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="bagel-7b: build the full-size architecture with random bf16 weights",
    )
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=0, help="default: --concurrency")
    p.add_argument("--recipe", default="irg")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--timesteps", type=int, default=20)
    p.add_argument("--think-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for each side: the sequential run's torch threads, the engine's "
        "cpu_threads (loop and image workers together); 0: torch's default, all cores",
    )
    p.add_argument(
        "--image-workers",
        type=int,
        default=1,
        help="engine threads for VAE encodes/decodes beside the step loop",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run both halves this many times, alternating; times are medians, latencies pooled",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args, rest = p.parse_known_args(argv)  # bagel-7b passes its own flags on to gpu_bench
    if args.preset == "tiny" and rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.preset == "bagel-7b":
        from gpu_bench import main as gpu_main  # the full-size benchmark needs a GPU

        return gpu_main(argv)
    result = tiny_bench(args)
    if args.json:
        print(json.dumps(result))
        print(table(result), file=sys.stderr)
    else:
        print(table(result))
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
