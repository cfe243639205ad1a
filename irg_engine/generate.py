"""Offline generation: run one recipe on a checkpoint and write the images and texts to a folder.

`python -m irg_engine.generate "a prompt" --out DIR [--model DIR] [--recipe irg] [options]`
runs the sequential reference recipe (no server, no batching) and writes `round{r}.png` per image
and `texts.json` / `texts.md`. Without `--model` it uses the embedded tiny random model, created
under `weights/` on first use.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from PIL import Image

from irg_engine import checkpoint, images
from irg_engine.recipes import RecipeParams, run
from irg_engine.recipes.params import RECIPE_NAMES
from irg_engine.tiny import DEFAULT_NAME, write_tiny

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "weights" / DEFAULT_NAME


def ensure_default_model(path: Path = DEFAULT_MODEL_DIR) -> Path:
    """The embedded default: a tiny random model, written once (takes a few seconds)."""
    if not (path / "tiny_model_info.json").is_file():
        print(f"creating the embedded tiny random model in {path} ...", file=sys.stderr)
        write_tiny(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m irg_engine.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--recipe", choices=RECIPE_NAMES, default="irg")
    p.add_argument("--image", type=Path, help="input image (edit, understand)")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-timesteps", type=int, default=50)
    p.add_argument("--max-think-tokens", type=int, default=4096)
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--refine-rounds", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        model = checkpoint.load(args.model or ensure_default_model(), device=args.device)
        image = Image.open(args.image) if args.image else None
        params = RecipeParams(
            args.prompt,
            recipe=args.recipe,
            image=image,
            width=args.width,
            height=args.height,
            seed=args.seed,
            num_timesteps=args.num_timesteps,
            max_think_tokens=args.max_think_tokens,
            temperature=args.temperature,
            refine_rounds=args.refine_rounds,
        )
    except (checkpoint.CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    result = run(model, params)
    args.out.mkdir(parents=True, exist_ok=True)
    for img in result.images:
        (args.out / f"round{img.round}.png").write_bytes(images.encode_png(img.pixels))
    texts = [{"stage": t.stage, "round": t.round, "text": t.text} for t in result.texts]
    (args.out / "texts.json").write_text(json.dumps(texts, indent=2, ensure_ascii=False))
    md = "\n\n".join(f"## {t['stage']} (round {t['round']})\n\n{t['text']}" for t in texts)
    (args.out / "texts.md").write_text(f"# {params.prompt}\n\nmodel: {model.name}\n\n{md}\n")
    print(
        f"{model.name}: {len(result.texts)} texts, {len(result.images)} images in "
        f"{time.perf_counter() - start:.1f}s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
