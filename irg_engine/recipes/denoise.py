"""Settings and sizes of one generated image, and the record of one denoising step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from irg_engine import flow
from irg_engine.config import BagelConfig

MAX_SIDE = 1024


@dataclass(slots=True)
class ImageSettings:
    width: int = 1024
    height: int = 1024
    num_timesteps: int = 50
    timestep_shift: float = 3.0
    guidance: flow.Guidance = field(default_factory=flow.Guidance)

    def __post_init__(self) -> None:
        for side, name in ((self.width, "width"), (self.height, "height")):
            if side <= 0 or side % 16 or side > MAX_SIDE:
                raise ValueError(
                    f"{name} must be a positive multiple of 16 and at most {MAX_SIDE}, got {side}"
                )
        if self.num_timesteps < 2:
            raise ValueError("num_timesteps must be >= 2")
        if self.timestep_shift <= 0:
            raise ValueError("timestep_shift must be > 0")


@dataclass(slots=True)
class StepTrace:
    index: int
    t: float
    x_t: torch.Tensor
    v_cond: torch.Tensor
    v_text_free: torch.Tensor | None
    v_img_free: torch.Tensor | None
    v: torch.Tensor


def latent_grid(cfg: BagelConfig, width: int, height: int) -> tuple[int, int]:
    px = cfg.pixels_per_latent_token
    return height // px, width // px


def initial_noise(
    cfg: BagelConfig, grid: tuple[int, int], generator: torch.Generator | None
) -> torch.Tensor:
    return torch.randn(grid[0] * grid[1], cfg.latent_token_dim, generator=generator)
