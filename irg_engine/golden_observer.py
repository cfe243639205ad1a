"""The observer that replays a golden case: it feeds the stored noise (and, for IRG turn 2,
optionally the stored image-1 pixels) into a recipe program and records every intermediate the
golden data stores (decode logits, segments, denoising steps, latents, decoded images), so
`parity_cases.py` can compare them.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from irg_engine.recipes.denoise import StepTrace
from irg_engine.recipes.params import ImageOut, Observer, TextOut


class GoldenObserver(Observer):
    """Feeds stored noise (and optionally stored pixels) and records what the data stores."""

    def __init__(self, noises: dict[int, torch.Tensor], pixels: dict[int, np.ndarray]) -> None:
        self.noises, self.stored_pixels = noises, pixels
        self.steps: dict[int, list[StepTrace]] = defaultdict(list)
        self.tokens: dict[int, torch.Tensor] = {}
        self.decoded: dict[int, torch.Tensor] = {}
        self.images: dict[int, ImageOut] = {}
        self.thinks: dict[int, tuple[TextOut, list[int]]] = {}
        self.decode_steps: dict[int, list[tuple[int, torch.Tensor]]] = defaultdict(list)
        self.segments: list[tuple[str, list[int], int]] = []

    def text_token(self, stage, round, token, position, logits) -> None:
        self.decode_steps[round].append((position, logits.cpu()))

    def text_segment(self, context: str, ids: list[int], start: int) -> None:
        self.segments.append((context, ids, start))

    def text_done(self, out: TextOut, generated: list[int]) -> None:
        self.thinks[out.round] = (out, generated)

    def image_step(self, round: int, trace: StepTrace, total: int) -> None:
        self.steps[round].append(trace)

    def image_done(self, round, tokens, decoded, out) -> None:
        self.tokens[round], self.decoded[round], self.images[round] = tokens, decoded, out

    def feedback_pixels(self, round: int, pixels: np.ndarray) -> np.ndarray:
        return self.stored_pixels.get(round, pixels)

    def noise(self, round: int, default: torch.Tensor) -> torch.Tensor:
        return self.noises[round]
