"""Tiny random checkpoints in exactly the published BAGEL layout (for tests and the demo server).

`python -m irg_engine.tiny DIR [--seed N]` writes `llm_config.json`, `vit_config.json`,
`ema.safetensors` (bf16, published names), `ae.safetensors` (float32, FLUX names), the tokenizer
and `tiny_model_info.json` (the values the published code hard-codes, plus `random_weights: true`
so that every place that reports the model's name can say it is random). By default the tokenizer
is the real Qwen2.5 one (`qwen_vocab.py`), so prompts tokenise as with a real checkpoint; the
embedding table then has the real model's 152,064 rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from irg_engine.config import BagelConfig, LMConfig, ViTConfig
from irg_engine.model.bagel import Bagel
from irg_engine.model.embed import sincos_2d
from irg_engine.model.vae import AutoEncoder, VaeConfig
from irg_engine.published_names import published_names
from irg_engine.qwen_vocab import write_qwen_tokenizer
from irg_engine.tokenizer import Tokenizer

DEFAULT_NAME = "irg-tiny-random"
QWEN_EMBEDDING_ROWS = 152_064
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def tiny_config(vocab_size: int) -> BagelConfig:
    return BagelConfig(
        lm=LMConfig(
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=128,
            vocab_size=vocab_size,
        ),
        vit=ViTConfig(hidden_size=32, num_heads=2, intermediate_size=64, num_layers=2),
        vae=VaeConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2, z_channels=16),
    )


def _randomise(bagel: Bagel, generator: torch.Generator) -> None:
    """Weights large enough that every component visibly changes the outputs."""
    with torch.no_grad():
        # By published part (the state dict's views into the joined projections): the same
        # draws, in the same order, whatever the modules join.
        for name, p in bagel.state_dict().items():
            if name.endswith("pos_embed"):
                continue
            if p.dim() == 1:
                base = 1.0 if "norm" in name else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
        hidden = bagel.cfg.lm.hidden_size
        bagel.latent_pos.pos_embed.copy_(sincos_2d(hidden, bagel.cfg.max_latent_size))
        bagel.vit.pos_table.pos_embed.copy_(sincos_2d(hidden, bagel.cfg.vit.max_patches_per_side))


def _tokenizer(out: Path, source: Path | None) -> int:
    if source is None:
        write_qwen_tokenizer(out)
        return QWEN_EMBEDDING_ROWS
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    return Tokenizer.from_dir(out).vocab_size


def write_tiny(
    out: str | Path,
    seed: int = 0,
    tokenizer_from: str | Path | None = None,
    name: str = DEFAULT_NAME,
) -> Path:
    """Write a random tiny model to `out` (created if needed) and return the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _tokenizer(out, Path(tokenizer_from) if tokenizer_from else None)
    cfg = tiny_config(vocab)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # module constructors draw from the global generator
    bagel, vae = Bagel(cfg), AutoEncoder(cfg.vae)
    _randomise(bagel, generator)
    names = published_names(cfg)
    state = {names[k]: v.to(torch.bfloat16).contiguous() for k, v in bagel.state_dict().items()}
    save_file(state, str(out / "ema.safetensors"))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(out / "ae.safetensors"))
    lm, vit = cfg.lm, cfg.vit
    tok = Tokenizer.from_dir(out)
    llm_json = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": lm.hidden_size,
        "intermediate_size": lm.intermediate_size,
        "num_hidden_layers": lm.num_layers,
        "num_attention_heads": lm.num_heads,
        "num_key_value_heads": lm.num_kv_heads,
        "vocab_size": lm.vocab_size,
        "rope_theta": lm.rope_theta,
        "rms_norm_eps": lm.rms_eps,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": tok.im_start,
        "eos_token_id": tok.im_end,
    }
    vit_json = {
        "model_type": "siglip_vision_model",
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": vit.hidden_size,
        "intermediate_size": vit.intermediate_size,
        "num_attention_heads": vit.num_heads,
        "num_hidden_layers": vit.num_layers + 1,
        "patch_size": vit.patch_size,
        "image_size": vit.patch_size * vit.max_patches_per_side,
        "layer_norm_eps": vit.layer_norm_eps,
        "num_channels": 3,
    }
    vae_cfg = cfg.vae
    info = {
        "note": "Written by irg_engine.tiny: RANDOM weights, for tests and demos only.",
        "name": f"{name} (random weights)",
        "random_weights": True,
        "seed": seed,
        "bagel_config": {
            "latent_patch_size": cfg.latent_patch_size,
            "max_latent_size": cfg.max_latent_size,
            "vit_max_num_patch_per_side": vit.max_patches_per_side,
        },
        "vae_params": {
            "ch": vae_cfg.ch,
            "ch_mult": list(vae_cfg.ch_mult),
            "num_res_blocks": vae_cfg.num_res_blocks,
            "z_channels": vae_cfg.z_channels,
            "resolution": vae_cfg.resolution,
            "downsample": vae_cfg.downsample,
            "scale_factor": vae_cfg.scale_factor,
            "shift_factor": vae_cfg.shift_factor,
        },
    }
    for fname, data in (
        ("llm_config.json", llm_json),
        ("vit_config.json", vit_json),
        ("tiny_model_info.json", info),
    ):
        (out / fname).write_text(json.dumps(data, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m irg_engine.tiny",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokenizer-from",
        type=Path,
        default=None,
        help="copy the tokenizer files of this folder instead of building Qwen2.5's",
    )
    args = parser.parse_args(argv)
    out = write_tiny(args.dir, args.seed, args.tokenizer_from)
    print(f"wrote a tiny random BAGEL-layout checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
