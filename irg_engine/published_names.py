"""The published BAGEL tensor names and how they map onto this package's module paths.

The only place that knows the names in `ema.safetensors` (`language_model.model.layers.N...`,
`vit_model.vision_model...`, the `_moe_gen` generation expert): `internal_name` maps one published
name to our parameter path, `published_names` lists them all for a config (the tiny checkpoint
writer uses it), and `checkpoint.load` uses `published_to_internal` and the patch-embedding
helpers while it streams tensors in.
"""

from __future__ import annotations

import re

import torch

from irg_engine.config import BagelConfig

# Published name -> our module path. Order matters only for readability.
_LLM = r"language_model\.model\.layers\.(\d+)\."
_VIT = r"vit_model\.vision_model\."
_RULES: list[tuple[str, str]] = [
    (r"language_model\.model\.embed_tokens\.weight", r"lm.embed_tokens.weight"),
    (r"language_model\.lm_head\.weight", r"lm.lm_head.weight"),
    (r"language_model\.model\.norm\.weight", r"lm.norms.0.weight"),
    (r"language_model\.model\.norm_moe_gen\.weight", r"lm.norms.1.weight"),
    (_LLM + r"input_layernorm(_moe_gen)?\.weight", r"lm.layers.\1.experts.E.input_norm.weight"),
    (
        _LLM + r"post_attention_layernorm(_moe_gen)?\.weight",
        r"lm.layers.\1.experts.E.post_norm.weight",
    ),
    (
        _LLM + r"self_attn\.([qkvo])_proj(_moe_gen)?\.(weight|bias)",
        r"lm.layers.\1.experts.E.\2_proj.\4",
    ),
    (_LLM + r"self_attn\.([qk])_norm(_moe_gen)?\.weight", r"lm.layers.\1.experts.E.\2_norm.weight"),
    (
        _LLM + r"mlp(_moe_gen)?\.(gate|up|down)_proj\.weight",
        r"lm.layers.\1.experts.E.\3_proj.weight",
    ),
    (r"time_embedder\.mlp\.([02])\.(weight|bias)", r"time_embedder.mlp.\1.\2"),
    (r"(vae2llm|llm2vae)\.(weight|bias)", r"\1.\2"),
    (r"latent_pos_embed\.pos_embed", r"latent_pos.pos_embed"),
    (r"vit_pos_embed\.pos_embed", r"vit.pos_table.pos_embed"),
    (r"connector\.(fc[12])\.(weight|bias)", r"vit.connector_\1.\2"),
    (_VIT + r"embeddings\.patch_embedding\.(weight|bias)", r"vit.patch_embed.\1"),
    (_VIT + r"embeddings\.position_embedding\.weight", r"vit.position_embedding.weight"),
    (_VIT + r"encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"vit.layers.\1.norm\2.\3"),
    (
        _VIT + r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)",
        r"vit.layers.\1.\2_proj.\3",
    ),
    (_VIT + r"encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"vit.layers.\1.\2.\3"),
    (_VIT + r"post_layernorm\.(weight|bias)", r"vit.post_norm.\1"),
]
_COMPILED = [(re.compile(p + "$"), r) for p, r in _RULES]
_VIT_LAYER = re.compile(_VIT + r"encoder\.layers\.(\d+)\.")


def internal_name(published: str) -> str | None:
    """Our parameter path for a published BAGEL tensor name, or None if it is not one."""
    for pattern, repl in _COMPILED:
        m = pattern.match(published)
        if m:
            name = m.expand(repl)
            if ".E." in name:
                name = name.replace(".E.", ".1." if "_moe_gen" in published else ".0.")
            return name
    return None


def published_names(cfg: BagelConfig) -> dict[str, str]:
    """Our parameter path -> published name, for every tensor of a model with this config."""
    names = [
        "language_model.model.embed_tokens.weight",
        "language_model.lm_head.weight",
        "language_model.model.norm.weight",
        "language_model.model.norm_moe_gen.weight",
        "latent_pos_embed.pos_embed",
        "vit_pos_embed.pos_embed",
        "vit_model.vision_model.embeddings.position_embedding.weight",
    ]
    names += [
        f"{m}.{p}"
        for m in (
            "vae2llm",
            "llm2vae",
            "time_embedder.mlp.0",
            "time_embedder.mlp.2",
            "connector.fc1",
            "connector.fc2",
            "vit_model.vision_model.embeddings.patch_embedding",
            "vit_model.vision_model.post_layernorm",
        )
        for p in ("weight", "bias")
    ]
    for i in range(cfg.lm.num_layers):
        pre = f"language_model.model.layers.{i}."
        for g in ("", "_moe_gen"):
            names += [
                f"{pre}input_layernorm{g}.weight",
                f"{pre}post_attention_layernorm{g}.weight",
                f"{pre}self_attn.o_proj{g}.weight",
            ]
            names += [f"{pre}self_attn.{x}_proj{g}.{p}" for x in "qkv" for p in ("weight", "bias")]
            names += [f"{pre}self_attn.{x}_norm{g}.weight" for x in "qk"]
            names += [f"{pre}mlp{g}.{x}_proj.weight" for x in ("gate", "up", "down")]
    for i in range(cfg.vit.num_layers):
        pre = f"vit_model.vision_model.encoder.layers.{i}."
        mods = ["layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"]
        mods += [f"self_attn.{x}_proj" for x in ("q", "k", "v", "out")]
        names += [f"{pre}{m}.{p}" for m in mods for p in ("weight", "bias")]
    return {internal_name(n): n for n in names}


def published_to_internal(
    headers: dict[str, tuple[list[int], str]], cfg: BagelConfig
) -> tuple[dict[str, str], list[str]]:
    """Map published names; the ViT layers past the used count are dropped, unknowns returned."""
    mapping, unknown = {}, []
    for name in headers:
        m = _VIT_LAYER.match(name)
        if m and int(m.group(1)) >= cfg.vit.num_layers:
            continue
        internal = internal_name(name)
        if internal is None:
            unknown.append(name)
        else:
            mapping[name] = internal
    return mapping, unknown


def patch_embed_as_linear(t: torch.Tensor) -> torch.Tensor:
    """A Conv2d patch embedding `[o, c, p, p]` as the Linear over (row, col, channel) patches."""
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1) if t.dim() == 4 else t


def patch_shape(name: str, shape: list[int]) -> list[int]:
    """A published shape as our parameter holds it (the conv patch embedding as a Linear)."""
    if "patch_embedding.weight" in name and len(shape) == 4:
        return [shape[0], shape[1] * shape[2] * shape[3]]
    return shape
