"""Full-size benchmark (GPU): the BAGEL-7B-MoT architecture with random bf16 weights.

    python bench/engine_bench.py --preset bagel-7b --random-weights [--json]
    python bench/gpu_bench.py --shape tiny --device cpu      (a smoke test of this script)

Nothing is downloaded: the model is built at full size on the device with random weights (the
real Qwen2.5 tokenizer is built offline). It runs the phases of `gpu_phases.py` and measures,
next to the floors of DESIGN.md section 7:
- one denoising pass at 1024x1024 (4096 latent tokens against a 512-token context): time and
  TFLOP/s (matmul + attention FLOPs of the generation expert); the same pass against image 2's
  long context (`--long-context`);
- decode steps at 1, 8 and 32 requests over ~600-token contexts: time per step, tokens/s; at 32
  also without decode-ahead and eager, for comparison;
- steps of 16 short prompt prefills of lengths no step has seen, as served and with cuDNN's
  attention allowed for them (a cost per new shape shows here);
- one IRG request alone (per-stage times) and throughput of `--concurrent` IRG requests, against
  the request's denoising passes (counted from the recipe's guidance; `gpu_probes.irg_passes`):
  at DESIGN.md's floor per pass for the request alone, and at the measured passes, each at its
  context's length, for the denoise-bound ceiling.
Timesteps and think lengths are flags so that the whole script fits in one short device call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from gpu_phases import (
    DECODE_MODES,
    bench_decode,
    bench_denoise,
    bench_irg,
    bench_paged_attention,
    bench_prefill_shapes,
)
from gpu_probes import irg_passes, run_phase

from irg_engine.config import BagelConfig, EngineConfig, LMConfig, ViTConfig
from irg_engine.engine import Engine
from irg_engine.model.bagel import Bagel, LoadedModel
from irg_engine.model.embed import sincos_2d
from irg_engine.model.vae import AutoEncoder, VaeConfig
from irg_engine.qwen_vocab import build_qwen_tokenizer
from irg_engine.recipes import RecipeParams
from irg_engine.tiny import tiny_config
from irg_engine.tokenizer import Tokenizer

# DESIGN.md section 7 (one H200, bf16): measured naive eager numbers and their floors.
FLOORS = {"denoise_1024_ms": 81.0, "decode_1_ms": 3.1, "decode_32_ms": 3.3}
ANCHORS = {"denoise_1024_ms": 102.0, "decode_1_ms": 13.5, "decode_32_ms": 14.8}


def bagel_7b() -> BagelConfig:
    return BagelConfig(
        lm=LMConfig(
            hidden_size=3584,
            num_layers=28,
            num_heads=28,
            num_kv_heads=4,
            intermediate_size=18944,
            vocab_size=152064,
        ),
        vit=ViTConfig(hidden_size=1152, num_heads=16, intermediate_size=4304, num_layers=26),
        vae=VaeConfig(),
    )


def random_model(cfg: BagelConfig, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    with torch.device("meta"):
        bagel, vae = Bagel(cfg), AutoEncoder(cfg.vae)
    bagel.to_empty(device=device)
    vae.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for module in (bagel, vae):
            for name, p in module.named_parameters():
                if p.dim() == 1:
                    p.fill_(1.0 if "norm" in name else 0.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)
        bagel.latent_pos.pos_embed.copy_(sincos_2d(cfg.lm.hidden_size, cfg.max_latent_size))
        bagel.vit.pos_table.pos_embed.copy_(
            sincos_2d(cfg.lm.hidden_size, cfg.vit.max_patches_per_side)
        )
    bagel.to(dtype)
    return LoadedModel(
        bagel.eval(),
        vae.eval(),
        Tokenizer(build_qwen_tokenizer()),
        name="bagel-7b (random weights)",
        random_weights=True,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="bagel-7b")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--shape", choices=["bagel-7b", "tiny"], default="bagel-7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bf16 on CUDA")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--timesteps", type=int, default=50)
    p.add_argument("--think-tokens", type=int, default=256)
    p.add_argument(
        "--long-context",
        type=int,
        default=9000,
        help="context of the second timed denoise pass: image 2's main context at 1024 px "
        "(text, image 1's VAE and ViT blocks; DESIGN.md 7)",
    )
    p.add_argument("--concurrent", type=int, default=16)
    p.add_argument(
        "--concurrent-timesteps",
        type=int,
        default=12,
        help="timesteps of the throughput run (kept short to fit one device call)",
    )
    p.add_argument("--concurrent-think-tokens", type=int, default=64)
    p.add_argument(
        "--phases",
        type=lambda v: set(v.split(",")),
        default={"denoise", "decode", "prefill", "irg"},
        help="comma-separated subset of denoise,decode,prefill,irg (default: all)",
    )
    p.add_argument("--out", help="also write the JSON here, after every phase")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="write profiler tables (kernels by device time) of one denoise pass and of the "
        "32-request decode step, graphed and eager, into DIR",
    )
    p.add_argument("--json", action="store_true")
    args, _ = p.parse_known_args(argv)
    device = torch.device(args.device)
    default_dtype = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, args.dtype or default_dtype)
    cfg = bagel_7b() if args.shape == "bagel-7b" else tiny_config(152064)
    t0 = time.perf_counter()
    model = random_model(cfg, device, dtype)
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": args.shape,
        "dtype": str(dtype),
        "build_s": time.perf_counter() - t0,
        "floors": FLOORS,
        "anchors": ANCHORS,
    }
    config = EngineConfig(max_running=max(32, args.concurrent), token_budget=16384)
    engine = Engine(model, config)

    def profile(name: str) -> str | None:
        return f"{args.profile}/profile_{name}.txt" if args.profile else None

    steps = [
        (
            "denoise",
            lambda: bench_denoise(
                model, engine, args.size, 3, args.long_context, profile("denoise")
            ),
        )
    ]
    decodes = ((1, "graphs"), (8, "graphs"), (32, "graphs"), (32, "no_ahead"), (1, "eager"))
    for b, mode in (*decodes, (32, "eager")):
        name = f"{DECODE_MODES[mode]}_{b}"
        profiled = profile(name) if b == 32 and mode != "no_ahead" else None
        repeat = 10 if mode == "eager" else 20
        steps.append(
            (
                name,
                lambda b=b, m=mode, r=repeat, p=profiled: bench_decode(
                    model, engine, b, 600, r, m, p
                ),
            )
        )
    steps.append(("decode_paged_attention", lambda: bench_paged_attention(device)))
    steps.append(("prefill", lambda: bench_prefill_shapes(model, engine)))
    for name, fn in steps:
        if name.split("_")[0] in args.phases:
            run_phase(result, name, lambda fn=fn: result.update(fn()), args.out)
    engine.close()
    steps.clear()  # drops the engine's KV cache before the request runs build their own
    engine = None
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the request runs size their KV pool from free memory

    def denoise_seconds(timesteps: int) -> tuple[float, float | None]:
        """One IRG request's denoising: at DESIGN.md's floor per pass, and at the passes
        measured above (each at the length of context it attends to), if they ran."""
        n = irg_passes(RecipeParams("", num_timesteps=timesteps))
        floor = (n["short_context"] + n["long_context"]) * FLOORS["denoise_1024_ms"] / 1e3
        if "denoise_long_ms" not in result:
            return floor, None
        ms = n["short_context"] * result["denoise_ms"]
        return floor, (ms + n["long_context"] * result["denoise_long_ms"]) / 1e3

    def alone() -> None:
        result["irg_alone"] = bench_irg(model, config, 1, args)
        floor, measured = denoise_seconds(args.timesteps)
        result["irg_alone_vs_denoise_floor"] = result["irg_alone"]["seconds"] / floor
        if measured:
            result["irg_alone_vs_measured_passes"] = result["irg_alone"]["seconds"] / measured

    def concurrent() -> None:
        short = argparse.Namespace(
            size=args.size,
            timesteps=args.concurrent_timesteps,
            think_tokens=args.concurrent_think_tokens,
        )
        result["irg_concurrent"] = bench_irg(model, config, args.concurrent, short)
        _, measured = denoise_seconds(args.concurrent_timesteps)
        if measured:  # the ceiling: nothing but each request's denoising passes, back to back
            rate = result["irg_concurrent"]["requests_per_s"]
            result["irg_concurrent_vs_denoise_ceiling"] = rate * measured

    if "irg" in args.phases:
        run_phase(result, "irg_alone", alone, args.out)
        run_phase(result, "irg_concurrent", concurrent, args.out)
    print(json.dumps(result, indent=None if args.json else 2))
    return 1 if result.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
