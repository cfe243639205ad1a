"""What a request reports while it runs: the events the engine's client streams to the server.

Every event belongs to one request. The order for an IRG request is: `Queued`, think
`TextDelta`s, `TextDone`, `ImageProgress` (one per denoising step, with `ImagePartial` previews
when asked), `ImageDone`, the same for the reflection and the refined image, then `Finished`.
A request that fails, times out or is aborted ends with `Failed` instead; nothing follows the
final event.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class Queued:
    position: int  # 0 = next to start


@dataclass(slots=True)
class Started:
    queue_s: float


@dataclass(slots=True)
class TextDelta:
    stage: str  # think | reflect | answer
    round: int
    delta: str


@dataclass(slots=True)
class TextDone:
    stage: str
    round: int
    text: str


@dataclass(slots=True)
class ImageProgress:
    round: int
    step: int  # 1-based
    total_steps: int


@dataclass(slots=True)
class ImagePartial:
    round: int
    index: int
    pixels: np.ndarray  # uint8 [H, W, 3], a preview of the predicted clean image


@dataclass(slots=True)
class ImageDone:
    round: int
    pixels: np.ndarray  # uint8 [H, W, 3]


@dataclass(slots=True)
class Finished:
    """The end of a successful request: a summary without the pixels."""

    texts: list[dict] = field(default_factory=list)  # {stage, round, text}
    images: list[dict] = field(default_factory=list)  # {round, width, height}
    seed: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)


FAILURE_CODES = ("aborted", "timeout", "engine_error", "invalid_request", "shutdown")


@dataclass(slots=True)
class Failed:
    code: str  # one of FAILURE_CODES
    message: str

    def __post_init__(self) -> None:
        if self.code not in FAILURE_CODES:
            raise ValueError(f"unknown failure code {self.code!r}")


Event = (
    Queued
    | Started
    | TextDelta
    | TextDone
    | ImageProgress
    | ImagePartial
    | ImageDone
    | Finished
    | Failed
)
FINAL = (Finished, Failed)
