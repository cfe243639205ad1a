"""The HTTP protocol as pydantic models: request bodies, JSON answers and SSE event payloads.

Static limits (ranges, multiples of 16, known recipes) live in the field constraints, so they
appear in the OpenAPI schema and FastAPI rejects them before a route runs. Limits that need the
model or the settings (prompt length in tokens, image bytes and pixels, the server's cost caps)
are checked when a request is turned into engine parameters (`params.py`, `caps.py`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

Recipe = Literal["irg", "t2i", "think_t2i", "edit", "understand"]
RenormType = Literal["global", "channel", "text_channel"]
Stage = Literal["think", "reflect", "answer"]

# The model's limits; a server may cap each lower (settings `max_image_side`, `max_timesteps`,
# `max_refine_rounds`, `max_partial_images`, checked in `caps.py`).
MIN_SIDE, MAX_SIDE = 16, 1024
MIN_TIMESTEPS, MAX_TIMESTEPS = 2, 200
MAX_REFINE_ROUNDS = 4
MAX_PARTIAL_IMAGES = 3
Side = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=16)]
Timesteps = Annotated[int, Field(ge=MIN_TIMESTEPS, le=MAX_TIMESTEPS)]
RefineRounds = Annotated[int, Field(ge=0, le=MAX_REFINE_ROUNDS)]
PartialImages = Annotated[int, Field(ge=0, le=MAX_PARTIAL_IMAGES)]
Scale = Annotated[float, Field(ge=0.0, le=20.0)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
MAX_SEED = 2**63 - 1


class Strict(BaseModel):
    # Unknown fields are errors: a misspelt parameter must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_fields_only(cls, data: Any) -> Any:
        """The first unknown field, as one error. Left to `extra="forbid"`, a body of a million
        unknown keys makes a million error objects, built on the event loop (~15 s on 2 cores,
        every other client stalled)."""
        if isinstance(data, dict):
            unknown = next((k for k in data if k not in cls.model_fields), None)
            # A key no string can hold (a lone surrogate) is left to pydantic, which refuses the
            # body as a whole at the first such key.
            if isinstance(unknown, str) and _utf8(unknown):
                raise PydanticCustomError(
                    "extra_forbidden", "Extra inputs are not permitted", {"param": unknown}
                )
        return data


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class GenerateRequest(Strict):
    """POST /generate. Defaults are the IRG paper's settings."""

    prompt: str = Field(min_length=1, max_length=100_000)
    recipe: Recipe = "irg"
    image: str | None = Field(
        default=None, description="base64 image (or data: URL) for edit / understand"
    )
    width: Side = 1024
    height: Side = 1024
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="default: random")
    num_timesteps: Timesteps = 50
    timestep_shift: float = Field(default=3.0, gt=0.0, le=100.0)
    cfg_text_scale: Scale = 4.0
    cfg_img_scale: Scale | None = Field(default=None, description="default: per image (1.0, 2.0)")
    cfg_interval: tuple[Unit, Unit] | None = Field(
        default=None, description="default: [0.4, 1] first image, [0, 1] refined images"
    )
    cfg_renorm_type: RenormType | None = Field(
        default=None, description="default: global first image, text_channel refined images"
    )
    cfg_renorm_min: Unit = 0.0
    max_think_tokens: int = Field(default=4096, ge=1, le=65536)
    temperature: float = Field(default=0.3, ge=0.0, le=2.0)
    refine_rounds: RefineRounds = 1
    partial_images: PartialImages = 0
    stream: bool = False
    timeout_s: float | None = Field(
        default=None, gt=0.0, description="deadline in seconds (capped by the server's)"
    )

    @field_validator("cfg_interval")
    @classmethod
    def _interval_ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and value[0] > value[1]:
            raise ValueError("must be [low, high] with low <= high")
        return value


class TextItem(BaseModel):
    stage: Stage
    round: int
    text: str


class ImageItem(BaseModel):
    round: int
    b64_png: str
    width: int
    height: int


class GenerateResponse(BaseModel):
    id: str
    model: str
    texts: list[TextItem]
    images: list[ImageItem]
    seed: int
    timings: dict[str, float]
    usage: dict[str, int]


class ErrorDetail(BaseModel):
    code: str
    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: str | None = None
    value: object | None = None
    limit: object | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- OpenAI-compatible images API -------------------------------------------------------------


class ImagesRequest(Strict):
    """POST /v1/images/generations. Runs the IRG recipe; extra IRG fields are extensions."""

    # OpenAI clients send fields this server has no use for (quality, style, user...): those
    # are declared below and ignored; anything else is an error as on /generate.

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        """OpenAI's API takes null for every optional field (its clients send it for None):
        such a field is left unset, so it takes its default."""
        if isinstance(data, dict):
            # (An unknown field stays, null or not, for the unknown-field error.)
            fields = cls.model_fields
            return {
                k: v for k, v in data.items() if v is not None or k == "prompt" or k not in fields
            }
        return data

    prompt: str = Field(min_length=1, max_length=100_000)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=4)
    size: str = Field(default="1024x1024", description="WIDTHxHEIGHT (multiples of 16) or auto")
    response_format: Literal["b64_json"] = "b64_json"
    output_format: Literal["png"] = "png"
    stream: bool = False
    partial_images: PartialImages = 0
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    user: str | None = None
    # IRG extensions (not OpenAI fields)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    num_timesteps: Timesteps = 50
    max_think_tokens: int = Field(default=4096, ge=1, le=65536)
    temperature: float = Field(default=0.3, ge=0.0, le=2.0)
    refine_rounds: RefineRounds = 1
    timeout_s: float | None = Field(default=None, gt=0.0)


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    usage: dict[str, int | dict[str, int]]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "irg-server"
    random_weights: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
