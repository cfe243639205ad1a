"""What a checkpoint folder holds, for people: `python -m irg_engine.checkpoint inspect DIR`.

Files and sizes, tensor counts, dtypes and parameter counts per top-level group (as the files
name them), and the configuration the loader would build, with its overrides applied. It runs
the loader's checks that need only the headers and the tokenizer (names, shapes, dtypes, token
ids), so a folder that passes loads unless its weights hold NaN or Inf (which needs every byte
read).
"""

from __future__ import annotations

from pathlib import Path

from irg_engine.checkpoint import build_config, check_tensors, read_tokenizer
from irg_engine.checkpoint_files import find_files, tensor_headers


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def inspect(root: str | Path) -> str:
    """A human-readable summary of a checkpoint folder (files, tensors, parameters, config)."""
    files = find_files(Path(root))
    cfg = build_config(files)
    check_tensors(files, cfg)
    read_tokenizer(files, cfg)
    lines = [f"checkpoint {files.root}"]
    for p in sorted(files.root.iterdir()):
        if p.is_file():
            lines.append(f"  {p.name:32s} {_human(p.stat().st_size):>10s}")
    for path in [*files.bagel, files.ae]:
        headers = tensor_headers(path)
        groups: dict[str, int] = {}
        dtypes: dict[str, int] = {}
        for name, (shape, dt) in headers.items():
            count = 1
            for s in shape:
                count *= s
            top = name.split(".")[0]
            groups[top] = groups.get(top, 0) + count
            dtypes[dt] = dtypes.get(dt, 0) + 1
        total = sum(groups.values())
        lines.append(f"{path.name}: {len(headers)} tensors, {total:,} parameters, dtypes {dtypes}")
        for top, count in sorted(groups.items()):
            lines.append(f"  {top:24s} {count:>15,}")
    lm, vit, vae = cfg.lm, cfg.vit, cfg.vae
    lines += [
        f"language model: hidden {lm.hidden_size}, {lm.num_layers} layers, {lm.num_heads} heads / "
        f"{lm.num_kv_heads} kv heads of {lm.head_dim}, mlp {lm.intermediate_size}, "
        f"vocab {lm.vocab_size}, rope theta {lm.rope_theta:g}, qk-norm on, 2 experts",
        f"vision: hidden {vit.hidden_size}, {vit.num_layers} layers used, {vit.num_heads} heads, "
        f"patch {vit.patch_size}, {vit.max_patches_per_side}x{vit.max_patches_per_side} positions",
        f"autoencoder: ch {vae.ch}, ch_mult {list(vae.ch_mult)}, {vae.num_res_blocks} res blocks, "
        f"z {vae.z_channels}, downsample {vae.downsample}",
        f"latent grid {cfg.max_latent_size}x{cfg.max_latent_size}, patch {cfg.latent_patch_size}",
    ]
    lines.append("checks: tensor names, shapes and dtypes match the configuration; token ids fit")
    if files.info.get("random_weights") is True:
        lines.append("note: RANDOM weights (a tiny test model, not a trained checkpoint)")
    return "\n".join(lines)
