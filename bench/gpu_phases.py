"""The full-size benchmark's phases (`bench/gpu_bench.py` runs them): a denoising pass, decode
steps, steps of short prefills of new shapes, and IRG requests alone and concurrent. Each takes
the model and an engine (or its settings) and returns what it measured as a flat dict."""

from __future__ import annotations

import time

import torch
from gpu_probes import StageClock, sync, tally_steps, timed, write_profile

from irg_engine import events
from irg_engine.attention import sdpa
from irg_engine.config import BagelConfig, EngineConfig
from irg_engine.engine import Engine
from irg_engine.model.bagel import LoadedModel
from irg_engine.paged_plan import slot_index
from irg_engine.recipes import RecipeParams
from irg_engine.recipes.work import DecodeStep, PrefillText, Velocity
from irg_engine.request import Request, RequestContexts
from irg_engine.runner import Scheduled


def denoise_flops(cfg: BagelConfig, queries: int, context: int) -> float:
    lm = cfg.lm
    h, d = lm.hidden_size, lm.head_dim
    per_token = (
        2 * h * lm.num_heads * d + 2 * h * lm.num_kv_heads * d + 3 * h * lm.intermediate_size
    )
    attention = 4 * queries * (queries + context) * d * lm.num_heads
    return 2 * queries * per_token * lm.num_layers + attention * lm.num_layers


def bench_denoise(
    model: LoadedModel,
    engine: Engine,
    size: int,
    repeat: int,
    long_context: int,
    profile: str | None = None,
) -> dict:
    cfg = model.cfg
    ctx = RequestContexts(engine.pool)
    short, long = ctx.new("context"), ctx.new("long")
    engine.runner.step([Scheduled(PrefillText(short, list(range(100, 612))), 512)])
    ids = [100 + i % 50000 for i in range(long_context)]
    engine.runner.step([Scheduled(PrefillText(long, ids), long_context)])
    grid = (size // 16, size // 16)
    x = torch.randn(grid[0] * grid[1], cfg.latent_token_dim)

    def passes(*seqs) -> float:
        item = Velocity(list(seqs), x, 0.5, grid)
        return timed(lambda: engine.runner.step([Scheduled(item, 1)]), model.bagel.device, repeat)

    seconds = passes(short)
    write_profile(
        lambda: engine.runner.step([Scheduled(Velocity([short], x, 0.5, grid), 1)]),
        model.bagel.device,
        profile,
    )
    three = passes(short, short, short)
    long_seconds = passes(long)
    ctx.free_all()
    flops = denoise_flops(cfg, grid[0] * grid[1] + 2, 512)
    return {
        "denoise_ms": seconds * 1e3,
        "denoise_tflops": flops / seconds / 1e12,
        "denoise_3_branches_ms": three * 1e3,
        "denoise_long_context": long_context,
        "denoise_long_ms": long_seconds * 1e3,
    }


DECODE_MODES = {"graphs": "decode", "eager": "decode_eager", "no_ahead": "decode_no_ahead"}


def bench_decode(
    model: LoadedModel,
    engine: Engine,
    batch: int,
    context: int,
    steps: int,
    mode: str = "graphs",
    profile: str | None = None,
) -> dict:
    """Decode steps of `batch` requests: with graphs and decode-ahead (as served), `eager`
    (the packed forward) or `no_ahead` (graphs, each step launched after the last was read)."""
    ctx = RequestContexts(engine.pool)
    seqs = [ctx.new(f"r{i}") for i in range(batch)]
    for seq in seqs:
        engine.runner.step(
            [Scheduled(PrefillText(seq, list(range(1000, 1000 + context))), context)]
        )
    fed = [42] * batch

    def step() -> None:
        # Each request feeds back its drawn token, as a program does: with graphs, every step
        # after the first finds its rows already run ahead (irg_engine/decode_ahead.py).
        items = [Scheduled(DecodeStep(s, t), 1) for s, t in zip(seqs, fed, strict=True)]
        engine.runner.step(items)
        fed[:] = [sch.result.token for sch in items]

    runner = engine.runner
    graphs, ahead = runner.graphs, runner.ahead.enabled
    if mode == "eager":
        runner.graphs = None  # the packed eager forward, for comparison
    runner.ahead.enabled = ahead and mode == "graphs"
    try:
        seconds = timed(step, model.bagel.device, steps)
        write_profile(step, model.bagel.device, profile)
    finally:
        runner.graphs, runner.ahead.enabled = graphs, ahead
        runner.ahead.claim([])  # the last step's launch, never claimed
        ctx.free_all()
    tag = f"{DECODE_MODES[mode]}_{batch}"
    return {f"{tag}_ms": seconds * 1e3, f"{tag}_tokens_per_s": batch / seconds}


def bench_prefill_shapes(
    model: LoadedModel, engine: Engine, segments: int = 16, context: int = 300
) -> dict:
    """Steps of `segments` short prompt prefills after a shared context, every length one no
    step has seen: as served (segments under `sdpa.CUDNN_MIN_ROWS` queries keep off cuDNN)
    and with cuDNN allowed for them, two steps each. A cost per new shape shows here."""
    device = model.bagel.device
    ctx = RequestContexts(engine.pool)
    base = ctx.new("context")
    engine.runner.step([Scheduled(PrefillText(base, list(range(100, 100 + context))), context)])
    fresh = iter(range(20, 20 + 4 * segments))  # a new length for every segment
    served, result = sdpa.CUDNN_MIN_ROWS, {}
    for name, cut in (("served", served), ("cudnn", 0)):
        sdpa.CUDNN_MIN_ROWS = cut
        try:
            seconds = []
            for _ in range(2):
                items = []
                for i in range(segments):
                    n = next(fresh)
                    seq = ctx.fork(base, f"{name}{i}")
                    items.append(Scheduled(PrefillText(seq, list(range(500, 500 + n))), n))
                sync(device)
                t0 = time.perf_counter()
                engine.runner.step(items)
                sync(device)
                seconds.append(time.perf_counter() - t0)
                for sch in items:
                    ctx.free(sch.item.ctx)
        finally:
            sdpa.CUDNN_MIN_ROWS = served
        result[f"prefill_{segments}_new_shapes_ms_{name}"] = [s * 1e3 for s in seconds]
    ctx.free_all()
    return result


def bench_irg(model: LoadedModel, config: EngineConfig, n: int, args) -> dict:
    engine = Engine(model, config)
    steps = tally_steps(engine)
    clocks, finals = [], []
    start = time.perf_counter()
    for i in range(n):
        clock = StageClock()
        clocks.append(clock)
        params = RecipeParams(
            f"a bench prompt number {i}",
            width=args.size,
            height=args.size,
            num_timesteps=args.timesteps,
            max_think_tokens=args.think_tokens,
            seed=i,
        )
        engine.add(
            Request(
                str(i),
                params,
                lambda e: finals.append(e) if isinstance(e, events.FINAL) else None,
                observer=clock,
            )
        )
    with torch.no_grad():
        engine.run_until_idle()
    total = time.perf_counter() - start
    engine.close()
    bad = [f for f in finals if isinstance(f, events.Failed)]
    if bad:
        raise RuntimeError(f"IRG requests failed: {bad[:2]}")
    return {
        "requests": n,
        "seconds": total,
        "requests_per_s": n / total,
        "stages_of_first": clocks[0].marks,
        "runner_steps": steps,  # the rest of `seconds` is host work and image encodes/decodes
    }


def bench_paged_attention(device: torch.device, targets=(264, 528, 1056, 2112)) -> dict:
    """The paged decode-attention kernel alone at the decode phase's 32-request shape (28 query
    and 4 kv heads of 128, contexts of 600-631 in a 768-wide index), per call, for several
    grid targets (`decode.TARGET_PROGRAMS`, the programs it splits contexts into) at 4 and 8
    warps a program (`decode.SPLIT_WARPS`; keys without `_warps_8` are the 4-warp ones): data
    for tuning it. Off CUDA (no Triton kernel) it times the torch path once."""
    from irg_engine.attention import decode

    g = torch.Generator().manual_seed(0)
    b, slots, width = 32, 65536, 768
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    keys, values = (torch.randn(slots, 4, 128, generator=g).to(device, dtype) for _ in range(2))
    q = torch.randn(b, 28, 128, generator=g).to(device, dtype)
    lengths = [600 + i for i in range(b)]
    # Contexts in 16-token blocks scattered over the cache, as the pool hands them out.
    tables = torch.randint(0, slots // 16, (b, width // 16), generator=g).tolist()
    index, mask = slot_index(tables, lengths, 16, width)
    args = (q, keys, values, index.to(device), mask.to(device), torch.tensor(lengths).to(device))
    kept, result = (decode.TARGET_PROGRAMS, decode.SPLIT_WARPS), {}
    cuda = device.type == "cuda"
    try:
        for warps in (4, 8) if cuda else (4,):
            for target in targets if cuda else targets[:1]:
                decode.TARGET_PROGRAMS, decode.SPLIT_WARPS = target, warps
                seconds = timed(lambda: decode.decode_attention(*args), device, 50)
                suffix = "" if warps == 4 else f"_warps_{warps}"
                result[f"paged_attention_32_us_target_{target}{suffix}"] = seconds * 1e6
    finally:
        decode.TARGET_PROGRAMS, decode.SPLIT_WARPS = kept
    return result
