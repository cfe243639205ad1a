"""The FLUX autoencoder (the VAE of BAGEL): pixels in [-1, 1] <-> 16-channel latents.

This module owns the network only. Pixels [B, 3, H, W] go through the encoder (conv_in, one level
of resnet blocks per entry of `ch_mult` with a stride-2 downsample after every level but the last,
a mid block with one full self-attention, norm_out, swish, conv_out) to the moments
[B, 2 * z_channels, H / 8, W / 8] (mean, then logvar). The latent the language model sees is
`scale * (mean - shift)`; `decode` inverts that and runs the mirrored decoder back to pixels.

Submodule names follow the published checkpoint (`encoder.down.{i}.block.{j}.conv1`, ...) so that
the checkpoint loader can assign tensors by name without a mapping table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# GroupNorm settings shared by every norm in the network.
_NORM_GROUPS = 32
_NORM_EPS = 1e-6


@dataclass(slots=True)
class VaeConfig:
    """Shape and latent scaling of the autoencoder; defaults are the BAGEL-7B-MoT values."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256
    downsample: int = 8
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self) -> None:
        # Configs read from JSON carry lists; a tuple keeps the config hashable and immutable.
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult must be non-empty positive ints, got {self.ch_mult}")
        for name in ("ch", "num_res_blocks", "z_channels", "in_channels", "out_ch", "resolution"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for mult in self.ch_mult:
            if (self.ch * mult) % _NORM_GROUPS:
                raise ValueError(
                    f"every level width ch*mult must divide into {_NORM_GROUPS} groups, "
                    f"got ch={self.ch}, ch_mult={self.ch_mult}"
                )
        expected = 2 ** (len(self.ch_mult) - 1)
        if self.downsample != expected:
            raise ValueError(
                f"downsample={self.downsample} does not match {len(self.ch_mult)} levels "
                f"(which downsample by {expected})"
            )
        if self.scale_factor == 0:
            raise ValueError("scale_factor must be non-zero")

    @classmethod
    def from_dict(cls, params: dict) -> VaeConfig:
        """Build from a mapping such as `vae_params` of the tiny model info (unknown keys fail)."""
        return cls(**params)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_NORM_GROUPS, channels, eps=_NORM_EPS, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x)


class ResnetBlock(nn.Module):
    """Two norm-swish-conv3x3 stages with a residual; 1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # Only present when needed: the checkpoint has no nin_shortcut for same-width blocks.
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place on the block's own intermediates (bitwise the same values): one activation
        # buffer fewer per stage, 2-3% of a 512 px encode on the CPU.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1 convs for q, k, v and output."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)

        def heads(t: torch.Tensor) -> torch.Tensor:
            # [B, C, H, W] -> [B, 1 head, H*W, C], contiguous: SDPA's fused kernels need a unit
            # stride in C, and the strided view falls back to the math path (4x slower at 4096
            # positions, and it materialises the full score matrix).
            return t.reshape(b, 1, c, height * width).transpose(-1, -2).contiguous()

        out = F.scaled_dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)))
        out = out.transpose(-1, -2).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W: zero-pad right and bottom by one, then a 3x3 stride-2 conv without padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour repeat, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


class _DownLevel(nn.Module):
    """One encoder level: resnet `block`s, then an optional `downsample` (absent on the last)."""

    def __init__(self, blocks: list[ResnetBlock], downsample: Downsample | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _run_blocks(self.block, x)
        return x if self.downsample is None else self.downsample(x)


class _UpLevel(nn.Module):
    """One decoder level: resnet `block`s, then an optional `upsample` (absent on level 0)."""

    def __init__(self, blocks: list[ResnetBlock], upsample: Upsample | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _run_blocks(self.block, x)
        return x if self.upsample is None else self.upsample(x)


class _Mid(nn.Module):
    """Bottleneck: resnet, attention, resnet at constant width."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Pixels [B, in_channels, H, W] -> moments [B, 2 * z_channels, H / f, W / f]."""

    def __init__(self, cfg: VaeConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        levels = []
        block_in = cfg.ch
        for i, block_out in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            last = i == len(widths) - 1
            levels.append(_DownLevel(blocks, None if last else Downsample(block_in)))
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents [B, z_channels, h, w] -> pixels [B, out_ch, h * f, w * f].

    `up[i]` mirrors `down[i]`; they run from the deepest level to level 0, and every level but
    level 0 ends with an upsample.
    """

    def __init__(self, cfg: VaeConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in)
        levels: list[_UpLevel] = []
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, widths[i]))
                block_in = widths[i]
            levels.append(_UpLevel(blocks, Upsample(block_in) if i else None))
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(_swish(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """FLUX autoencoder with BAGEL's latent scaling; pixels are [-1, 1], latents are scaled."""

    def __init__(self, cfg: VaeConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Raw encoder output [B, 2 * z_channels, H / f, W / f]: mean channels, then logvar."""
        self._check_pixels(x)
        return self.encoder(x)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latent [B, z_channels, H / f, W / f] of pixels [B, 3, H, W] in [-1, 1].

        Without a generator this is the posterior mean (deterministic, what the golden data
        use); with one it samples mean + std * N(0, 1) as the published reference does.
        """
        mean, logvar = self.encode_moments(x).chunk(2, dim=1)
        z = mean
        if generator is not None:
            noise = torch.randn(
                mean.shape, generator=generator, device=generator.device, dtype=mean.dtype
            ).to(mean.device)
            z = mean + torch.exp(0.5 * logvar) * noise
        return self.config.scale_factor * (z - self.config.shift_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels [B, out_ch, h * f, w * f], nominally in [-1, 1] and not clamped."""
        if z.dim() != 4 or z.shape[1] != self.config.z_channels:
            raise ValueError(
                f"expected latents [B, {self.config.z_channels}, h, w], got {tuple(z.shape)}"
            )
        return self.decoder(z / self.config.scale_factor + self.config.shift_factor)

    def _check_pixels(self, x: torch.Tensor) -> None:
        f = self.config.downsample
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected pixels [B, {self.config.in_channels}, H, W], got {tuple(x.shape)}"
            )
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"H and W must be multiples of {f}, got {tuple(x.shape[-2:])}")
