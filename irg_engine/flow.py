"""Flow-matching math for image generation: pure functions on tensors, no model, no state.

Data flow of one denoising step: `guidance_active` decides which branches run at t; the model
gives velocities for the branches; `combine_guidance` mixes them (with its renorm); `euler_step`
moves x. `schedule` gives every step's t and dt up front.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RENORM_TYPES = ("global", "channel", "text_channel")


@dataclass(slots=True, frozen=True)
class Guidance:
    """Classifier-free guidance settings of one image."""

    text_scale: float = 4.0
    img_scale: float = 1.0
    interval: tuple[float, float] = (0.4, 1.0)
    renorm_type: str = "global"
    renorm_min: float = 0.0

    def __post_init__(self) -> None:
        if self.renorm_type not in RENORM_TYPES:
            raise ValueError(f"renorm_type must be one of {RENORM_TYPES}, got {self.renorm_type!r}")
        lo, hi = self.interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(
                f"guidance interval must satisfy 0 <= lo <= hi <= 1, got {self.interval}"
            )
        if self.text_scale < 0 or self.img_scale < 0:
            raise ValueError("guidance scales must be >= 0")


def schedule(num_timesteps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted timesteps of the T-1 model evaluations and their step sizes (float32)."""
    if num_timesteps < 2:
        raise ValueError("num_timesteps must be >= 2")
    t = torch.linspace(1, 0, num_timesteps)
    t = shift * t / (1 + (shift - 1) * t)
    return t[:-1], t[:-1] - t[1:]


def guidance_active(t: float, g: Guidance) -> tuple[bool, bool]:
    """Whether the text-free and image-free branches run at t (scale > 1 inside the interval)."""
    # The published loop compares a float32 timestep tensor, so the bounds act as float32 too.
    t32 = torch.tensor(t, dtype=torch.float32)
    inside = bool((t32 > g.interval[0]) & (t32 <= g.interval[1]))
    return inside and g.text_scale > 1.0, inside and g.img_scale > 1.0


def _norm(v: torch.Tensor, per_token: bool) -> torch.Tensor:
    return torch.linalg.vector_norm(v, dim=-1, keepdim=True) if per_token else v.norm()


def _renorm(v: torch.Tensor, ref: torch.Tensor, per_token: bool, lo: float) -> torch.Tensor:
    scale = (_norm(ref, per_token) / (_norm(v, per_token) + 1e-8)).clamp(min=lo, max=1.0)
    return v * scale


def combine_guidance(
    v_cond: torch.Tensor,
    v_text_free: torch.Tensor | None,
    v_img_free: torch.Tensor | None,
    g: Guidance,
) -> torch.Tensor:
    """Velocity of one image `[tokens, channels]` from its branches (None: branch not run).

    Norms are taken over this image only, so batching images never couples them.
    """
    if v_text_free is None and v_img_free is None:
        return v_cond
    v = v_cond
    if g.renorm_type == "text_channel":
        if v_text_free is not None:
            v = _renorm(
                v_text_free + g.text_scale * (v_cond - v_text_free), v_cond, True, g.renorm_min
            )
        if v_img_free is not None:
            v = v_img_free + g.img_scale * (v - v_img_free)
        return v
    if v_text_free is not None:
        v = v_text_free + g.text_scale * (v_cond - v_text_free)
    if v_img_free is not None:
        v = v_img_free + g.img_scale * (v - v_img_free)
    return _renorm(v, v_cond, g.renorm_type == "channel", g.renorm_min)


def euler_step(x: torch.Tensor, v: torch.Tensor, dt: torch.Tensor | float) -> torch.Tensor:
    """v points from data to noise, so a step towards t = 0 subtracts it."""
    return x - v * dt
