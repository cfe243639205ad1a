"""BAGEL-layout checkpoint folders: find, check and load them (names mapped by `published_names`).

A folder holds `llm_config.json`, `vit_config.json`, the BAGEL weights (`ema.safetensors`,
`ema_bf16.safetensors`, or shards listed in a `*.safetensors.index.json`), the FLUX autoencoder
`ae.safetensors` and the tokenizer files. Loading: read the JSON configs and apply the overrides the
published code applies (QK-norm on, the last ViT layer dropped, untied lm_head), infer the
autoencoder's shape from its tensors, build the modules on the meta device, then read each tensor
from the memory-mapped files, convert it to the target dtype/device and assign it (one copy of the
weights at any time; q/k/v and gate/up parts go straight into their rows of the joined
projections). Every problem is reported as one `CheckpointError` naming the file or the missing /
unexpected / mis-shaped tensors.

`python -m irg_engine.checkpoint inspect DIR` prints what a folder holds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from irg_engine.checkpoint_checks import (
    CheckpointError,
    check_dtypes,
    check_layer_count,
    check_names,
    check_weights,
)
from irg_engine.checkpoint_files import (
    CheckpointFiles,
    find_files,
    iter_tensors,
    tensor_headers,
    weight_headers,
)
from irg_engine.config import BagelConfig, LMConfig, ViTConfig
from irg_engine.host_memory import keep_large_blocks
from irg_engine.model.bagel import Bagel, LoadedModel
from irg_engine.model.lm import part_rows
from irg_engine.model.vae import AutoEncoder, VaeConfig
from irg_engine.published_names import (
    patch_embed_as_linear,
    patch_shape,
    published_to_internal,
)
from irg_engine.tokenizer import Tokenizer

FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159


def _vae_config(ae: dict[str, tuple[list[int], str]], info: dict) -> VaeConfig:
    def shape(name: str) -> list[int]:
        if name not in ae:
            raise CheckpointError(f"ae.safetensors: missing tensor {name}")
        return ae[name][0]

    ch = shape("encoder.conv_in.weight")[0]
    levels = sorted({int(k.split(".")[2]) for k in ae if k.startswith("encoder.down.")})
    mult = tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in levels)
    blocks = len({k.split(".")[4] for k in ae if k.startswith("encoder.down.0.block.")})
    params = info.get("vae_params", {})
    return VaeConfig(
        ch=ch,
        ch_mult=mult,
        num_res_blocks=blocks,
        z_channels=shape("decoder.conv_in.weight")[1],
        in_channels=shape("encoder.conv_in.weight")[1],
        out_ch=shape("decoder.conv_out.weight")[0],
        resolution=int(params.get("resolution", 256)),
        downsample=2 ** (len(mult) - 1),
        scale_factor=float(params.get("scale_factor", FLUX_SCALE)),
        shift_factor=float(params.get("shift_factor", FLUX_SHIFT)),
    )


def build_config(files: CheckpointFiles) -> BagelConfig:
    llm, vit, info = files.llm_config, files.vit_config, files.info
    headers = weight_headers(files)
    try:
        lm = LMConfig(
            hidden_size=llm["hidden_size"],
            num_layers=llm["num_hidden_layers"],
            num_heads=llm["num_attention_heads"],
            num_kv_heads=llm.get("num_key_value_heads", llm["num_attention_heads"]),
            intermediate_size=llm["intermediate_size"],
            vocab_size=llm["vocab_size"],
            rope_theta=float(llm.get("rope_theta", 1_000_000.0)),
            rms_eps=float(llm.get("rms_norm_eps", 1e-6)),
            qk_norm=True,  # the published loader forces QK-norm on whatever the JSON says
        )
        patch = vit.get("patch_size", 14)
        vit_cfg = ViTConfig(
            hidden_size=vit["hidden_size"],
            num_heads=vit["num_attention_heads"],
            intermediate_size=vit["intermediate_size"],
            num_layers=vit["num_hidden_layers"] - 1,  # BAGEL uses the second-to-last layer
            patch_size=patch,
            max_patches_per_side=vit.get("image_size", 980) // patch,
            layer_norm_eps=float(vit.get("layer_norm_eps", 1e-6)),
        )
    except KeyError as e:
        raise CheckpointError(f"{files.root}: config is missing key {e}") from None
    except (ValueError, TypeError, ArithmeticError, AttributeError) as e:
        raise CheckpointError(f"{files.root}: invalid config ({type(e).__name__}: {e})") from None
    check_layer_count(files.root, headers, lm.num_layers, vit_cfg.num_layers)
    latent_shape = headers.get("latent_pos_embed.pos_embed", ([64 * 64, 1],))[0]
    side = round(latent_shape[0] ** 0.5) if latent_shape else 0
    if len(latent_shape) != 2 or side < 1 or side * side != latent_shape[0]:
        raise CheckpointError(
            f"latent_pos_embed.pos_embed has shape {latent_shape}; expected [side * side, hidden]"
        )
    try:
        vae = _vae_config(tensor_headers(files.ae), info)
    except (IndexError, ValueError, TypeError, ArithmeticError) as e:
        raise CheckpointError(
            f"{files.ae}: cannot infer the autoencoder's shape ({type(e).__name__}: {e})"
        ) from None
    bagel_info = info.get("bagel_config", {})
    return BagelConfig(
        lm=lm,
        vit=vit_cfg,
        vae=vae,
        latent_patch_size=bagel_info.get("latent_patch_size", 2),
        max_latent_size=side,
    )


def check_tensors(
    files: CheckpointFiles, cfg: BagelConfig
) -> tuple[Bagel, AutoEncoder, dict[str, str]]:
    """Every tensor's name, shape and dtype against the modules `cfg` builds (on the meta device:
    nothing is read but the headers). Returns the modules and the published -> internal names."""
    with torch.device("meta"):
        bagel, vae = Bagel(cfg), AutoEncoder(cfg.vae)
    headers = weight_headers(files)
    mapping, unknown = published_to_internal(headers, cfg)
    found = {mapping[k]: patch_shape(k, headers[k][0]) for k in mapping}
    found.update({k: headers[k][0] for k in unknown})
    weights = files.weights_name
    check_names(weights, {k: v.shape for k, v in bagel.state_dict().items()}, found)
    check_dtypes(weights, {k: headers[k] for k in mapping})
    ae_headers = tensor_headers(files.ae)
    check_dtypes(files.ae.name, ae_headers)
    check_names(
        files.ae.name,
        {k: v.shape for k, v in vae.state_dict().items()},
        {k: s for k, (s, _) in ae_headers.items()},
    )
    return bagel, vae, mapping


def read_tokenizer(files: CheckpointFiles, cfg: BagelConfig) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_dir(files.root)
    except Exception as e:  # the tokenizers library raises bare Exceptions
        raise CheckpointError(f"{files.root / 'tokenizer.json'}: cannot load ({e})") from None
    if tokenizer.id_limit > cfg.lm.vocab_size:
        raise CheckpointError(
            f"{files.root}: tokenizer.json has ids up to {tokenizer.id_limit - 1} but the model "
            f"only {cfg.lm.vocab_size} embeddings"
        )
    return tokenizer


def load(
    root: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    vae_dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a BAGEL-layout folder. dtype defaults to bf16 on CUDA and float32 elsewhere."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        keep_large_blocks()
    files = find_files(Path(root))
    cfg = build_config(files)
    bagel, vae, mapping = check_tensors(files, cfg)
    tokenizer = read_tokenizer(files, cfg)

    state = {}
    joined = part_rows(bagel)  # q/k/v and gate/up parts: copied into their rows of one tensor
    shapes = {n: p.shape for n, p in bagel.named_parameters()}
    for shard in files.bagel:
        for name, tensor in iter_tensors(shard, "cpu"):
            if name not in mapping:
                continue
            internal = mapping[name]
            if internal in joined:
                target, start, end = joined[internal]
                if target not in state:
                    state[target] = torch.empty(shapes[target], device=device, dtype=dtype)
                state[target][start:end].copy_(tensor)
                continue
            tensor = patch_embed_as_linear(tensor) if "patch_embedding.weight" in name else tensor
            state[internal] = tensor.to(device=device, dtype=dtype)
    bagel.load_state_dict(state, assign=True, strict=True)
    del state
    vae_state = {n: t.to(device=device, dtype=vae_dtype) for n, t in iter_tensors(files.ae, "cpu")}
    vae.load_state_dict(vae_state, assign=True, strict=True)
    check_weights(files.weights_name, bagel)
    check_weights(files.ae.name, vae)
    bagel.eval()
    vae.eval()
    random = files.info.get("random_weights") is True
    name = files.info.get("name") or files.root.name
    return LoadedModel(bagel, vae, tokenizer, name=name, random_weights=random)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m irg_engine.checkpoint")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("inspect", help="print what a checkpoint folder holds").add_argument("dir")
    args = parser.parse_args(argv)
    # Run as `python -m`, this file is `__main__`; the report imports `irg_engine.checkpoint`,
    # whose CheckpointError is the one raised.
    from irg_engine import checkpoint
    from irg_engine.checkpoint_report import inspect

    try:
        print(inspect(args.dir))
    except checkpoint.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
