"""Drive a running IRG server and report what users would feel: throughput and latencies.

    python bench/serve_bench.py --server URL --num-prompts 32 --rate 0.5      # Poisson arrivals
    python bench/serve_bench.py --server URL --num-prompts 32 --concurrency 4 # closed loop

Every request streams (`/generate`, SSE), so the client sees the time to the first think token
and to the first image as they happen. The report (a table, and JSON with `--json PATH` or `-`)
gives completed / failed counts, requests and images per second, generated tokens per second,
and p50 / p90 / p99 of end-to-end latency, time to first think token and time to first image.
Request settings (`--recipe`, `--width`, `--num-timesteps`, `--max-think-tokens`...) go to every
request; unset ones take the server's defaults (the paper's settings).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

PROMPTS = [
    "a white cat sleeping on a wooden table next to three green apples",
    "a red vintage bicycle leaning against a yellow brick wall at sunset",
    "an astronaut reading a newspaper on a park bench, watercolor",
    "a glass teapot with blooming tea, studio lighting, macro photo",
    "a lighthouse on a cliff during a storm, dramatic oil painting",
    "two robots playing chess in a library, isometric illustration",
]
OPTIONAL = ("recipe", "width", "height", "num_timesteps", "max_think_tokens", "refine_rounds")


@dataclass
class Outcome:
    ok: bool = False
    error: str | None = None
    latency: float = 0.0
    ttft: float | None = None  # first think token
    ttfi: float | None = None  # first image
    images: int = 0
    generated_tokens: int = 0


@dataclass
class Report:
    mode: str
    num_prompts: int
    completed: int
    failed: int
    duration_s: float
    requests_per_s: float
    images_per_s: float
    generated_tokens_per_s: float
    latency_s: dict = field(default_factory=dict)
    time_to_first_think_token_s: dict = field(default_factory=dict)
    time_to_first_image_s: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)

    mean = round(sum(ordered) / len(ordered), 4)
    return {"mean": mean, "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


async def one_request(client: httpx.AsyncClient, body: dict) -> Outcome:
    out = Outcome()
    start = time.perf_counter()
    try:
        async with client.stream("POST", "/generate", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                out.error = f"http {response.status_code}"
                return out
            event = None
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    now = time.perf_counter() - start
                    if event == "text.delta" and out.ttft is None:
                        out.ttft = now
                    elif event == "image.done":
                        out.images += 1
                        out.ttfi = out.ttfi if out.ttfi is not None else now
                    elif event == "done":
                        data = json.loads(line[5:])
                        out.generated_tokens = data["usage"].get("generated_tokens", 0)
                        out.ok = True
                    elif event == "error":
                        out.error = json.loads(line[5:]).get("code", "error")
    except httpx.HTTPError as exc:
        out.error = type(exc).__name__
    finally:
        out.latency = time.perf_counter() - start
    if not out.ok and out.error is None:
        out.error = "incomplete"
    return out


async def run(args: argparse.Namespace) -> Report:
    base = {name: getattr(args, name) for name in OPTIONAL if getattr(args, name) is not None}
    bodies = [
        {**base, "prompt": PROMPTS[i % len(PROMPTS)], "seed": args.seed + i, "stream": True}
        for i in range(args.num_prompts)
    ]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(30.0, read=args.timeout)
    async with httpx.AsyncClient(
        base_url=args.server, headers=headers, timeout=timeout, limits=limits
    ) as client:
        start = time.perf_counter()
        if args.rate is not None:
            mode = f"poisson rate {args.rate}/s"
            rng = random.Random(args.seed)
            tasks = []
            for body in bodies:
                tasks.append(asyncio.ensure_future(one_request(client, body)))
                await asyncio.sleep(rng.expovariate(args.rate))
            outcomes = await asyncio.gather(*tasks)
        else:
            mode = f"concurrency {args.concurrency}"
            queue = list(bodies)
            outcomes = []

            async def worker() -> None:
                while queue:
                    outcomes.append(await one_request(client, queue.pop(0)))

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        duration = time.perf_counter() - start
    return summarise(mode, outcomes, duration)


def summarise(mode: str, outcomes: list[Outcome], duration: float) -> Report:
    ok = [o for o in outcomes if o.ok]
    errors: dict[str, int] = {}
    for o in outcomes:
        if not o.ok:
            errors[o.error or "unknown"] = errors.get(o.error or "unknown", 0) + 1
    return Report(
        mode=mode,
        num_prompts=len(outcomes),
        completed=len(ok),
        failed=len(outcomes) - len(ok),
        duration_s=round(duration, 3),
        requests_per_s=round(len(ok) / duration, 4),
        images_per_s=round(sum(o.images for o in ok) / duration, 4),
        generated_tokens_per_s=round(sum(o.generated_tokens for o in ok) / duration, 2),
        latency_s=percentiles([o.latency for o in ok]),
        time_to_first_think_token_s=percentiles([o.ttft for o in ok if o.ttft is not None]),
        time_to_first_image_s=percentiles([o.ttfi for o in ok if o.ttfi is not None]),
        errors=errors,
    )


def table(report: Report) -> str:
    rows = [
        ("mode", report.mode),
        ("completed / failed", f"{report.completed} / {report.failed}"),
        ("duration", f"{report.duration_s:.2f} s"),
        ("throughput", f"{report.requests_per_s:.3f} req/s, {report.images_per_s:.3f} images/s"),
        ("generated tokens", f"{report.generated_tokens_per_s:.1f} tok/s"),
    ]
    for label, stats in (
        ("latency", report.latency_s),
        ("first think token", report.time_to_first_think_token_s),
        ("first image", report.time_to_first_image_s),
    ):
        if stats:
            rows.append((label, " ".join(f"{k} {v:.3f}s" for k, v in stats.items())))
    if report.errors:
        rows.append(("errors", ", ".join(f"{k}: {v}" for k, v in report.errors.items())))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="serve_bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--server", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=16)
    load = p.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second")
    load.add_argument("--concurrency", type=int, default=4, help="requests in flight (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="read timeout per request")
    p.add_argument("--json", default=None, help="write the JSON report to PATH ('-': stdout)")
    p.add_argument("--recipe", default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--num-timesteps", type=int, default=None)
    p.add_argument("--max-think-tokens", type=int, default=None)
    p.add_argument("--refine-rounds", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rate is not None and args.rate <= 0:
        print("--rate must be > 0", file=sys.stderr)
        return 2
    report = asyncio.run(run(args))
    print(table(report))
    if args.json == "-":
        print(json.dumps(asdict(report), indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
