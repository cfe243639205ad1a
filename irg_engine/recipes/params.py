"""What a recipe takes and gives: request parameters, outputs, and the observer hook points.

`RecipeParams` is the engine-independent description of one request (the server validates into
it). `Observer` is how callers watch a recipe run (streaming, parity checks); its methods are
no-ops unless overridden. Recipe-specific defaults (guidance per image, system prompts) live in the
recipes; `None` in a parameter means "the recipe's default for that image".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from irg_engine import flow
from irg_engine.recipes.denoise import ImageSettings, StepTrace

RECIPE_NAMES = ("irg", "t2i", "think_t2i", "edit", "understand")
STAGES = ("think", "reflect", "answer")


@dataclass(slots=True)
class RecipeParams:
    prompt: str
    recipe: str = "irg"
    image: Image.Image | None = None
    width: int = 1024
    height: int = 1024
    seed: int = 0
    num_timesteps: int = 50
    timestep_shift: float = 3.0
    cfg_text_scale: float = 4.0
    cfg_img_scale: float | None = None
    cfg_interval: tuple[float, float] | None = None
    cfg_renorm_type: str | None = None
    cfg_renorm_min: float = 0.0
    max_think_tokens: int = 4096
    temperature: float = 0.3
    refine_rounds: int = 1
    partial_images: int = 0

    def __post_init__(self) -> None:
        if self.recipe not in RECIPE_NAMES:
            raise ValueError(f"recipe must be one of {RECIPE_NAMES}, got {self.recipe!r}")
        if self.recipe in ("edit", "understand") and self.image is None:
            raise ValueError(f"recipe {self.recipe!r} needs an input image")
        if self.max_think_tokens < 1:
            raise ValueError("max_think_tokens must be >= 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.refine_rounds < 0:
            raise ValueError("refine_rounds must be >= 0")
        # Validates sizes and timesteps once, for every image of the request.
        self.image_settings(flow.Guidance())

    def guidance(
        self, img_scale: float, interval: tuple[float, float], renorm: str
    ) -> flow.Guidance:
        """Guidance for one image: explicit parameters win over the recipe's defaults."""
        return flow.Guidance(
            text_scale=self.cfg_text_scale,
            img_scale=img_scale if self.cfg_img_scale is None else self.cfg_img_scale,
            interval=interval if self.cfg_interval is None else tuple(self.cfg_interval),
            renorm_type=renorm if self.cfg_renorm_type is None else self.cfg_renorm_type,
            renorm_min=self.cfg_renorm_min,
        )

    def image_settings(self, guidance: flow.Guidance, size: tuple[int, int] | None = None):
        w, h = size if size is not None else (self.width, self.height)
        return ImageSettings(w, h, self.num_timesteps, self.timestep_shift, guidance)


# Paper / published-app defaults per kind of image.
FIRST_IMAGE = dict(img_scale=1.0, interval=(0.4, 1.0), renorm="global")
REFINE_IMAGE = dict(img_scale=2.0, interval=(0.0, 1.0), renorm="text_channel")


@dataclass(slots=True)
class TextOut:
    stage: str
    round: int
    text: str
    ids: list[int]


@dataclass(slots=True)
class ImageOut:
    round: int
    pixels: np.ndarray  # uint8 [H, W, 3]

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


@dataclass
class RecipeResult:
    texts: list[TextOut] = field(default_factory=list)
    images: list[ImageOut] = field(default_factory=list)
    seed: int = 0


class Observer:
    """Hook points of a recipe run; subclasses override what they need."""

    def text_token(
        self, stage: str, round: int, token: int, position: int, logits: torch.Tensor
    ) -> None:
        """Each decode step: the token fed at this step, its position and its logits (float32,
        on the model's device: an observer that keeps them copies them to the host)."""

    def text_segment(self, context: str, ids: list[int], start: int) -> None:
        """A text segment was prefilled into the named context at positions from `start`."""

    def text_done(self, out: TextOut, generated: list[int]) -> None:
        """A text stage ended; `generated` are the raw decoded ids (start token first)."""

    def image_step(self, round: int, trace: StepTrace, total: int) -> None:
        """One denoising step of the image of `round` finished."""

    def image_partial(self, round: int, index: int, pixels: np.ndarray) -> None:
        """A preview (decoded predicted clean image) of the image of `round`."""

    def image_done(
        self, round: int, tokens: torch.Tensor, decoded: torch.Tensor, out: ImageOut
    ) -> None:
        """The image of `round` is done: final latent tokens, float VAE output, pixels."""

    def feedback_pixels(self, round: int, pixels: np.ndarray) -> np.ndarray:
        """The pixels of `round` that are fed back as context (parity swaps in stored ones)."""
        return pixels

    def noise(self, round: int, default: torch.Tensor) -> torch.Tensor:
        """Initial noise of the image of `round` (parity feeds the stored noise)."""
        return default
