"""Turns a validated request body into the engine's `RecipeParams`, checking the limits that need
the model or the settings: prompt length in tokens, the input image (base64, bytes, pixels,
decodability, whether the recipe takes one), the server's cost caps (`caps.py`) and deadline cap.

Every failure is an `ApiError` 400 naming the parameter, the value and the limit. The random
default seed is drawn here so the answer can report it.
"""

from __future__ import annotations

import base64
import binascii
import io
import secrets

from PIL import Image

from irg_engine import images
from irg_engine.recipes.params import RecipeParams
from irg_engine.tokenizer import Tokenizer
from server import caps
from server.errors import ApiError, invalid
from server.protocol import MAX_SEED, GenerateRequest
from server.settings import Settings

IMAGE_RECIPES = ("edit", "understand")


def check_prompt(prompt: str, tokenizer: Tokenizer, settings: Settings) -> int:
    """The prompt's length in tokens, or a 400 when it is over the limit."""
    n = len(tokenizer.encode(prompt))
    if n > settings.max_prompt_tokens:
        raise invalid(
            "prompt",
            f"prompt is {n} tokens long, over the limit of {settings.max_prompt_tokens}",
            n,
            settings.max_prompt_tokens,
        )
    return n


def decode_image(b64: str, settings: Settings) -> Image.Image:
    """PIL RGB image of a base64 string (a `data:` URL prefix is allowed)."""
    if b64.startswith("data:"):
        b64 = b64.partition(",")[2]
    # Reject by the encoded length first, so an oversized upload is never decoded.
    approx = len(b64) * 3 // 4
    if approx > settings.max_image_bytes + 3:
        raise invalid(
            "image",
            f"image is about {approx} bytes, over the limit of {settings.max_image_bytes}",
            approx,
            settings.max_image_bytes,
        )
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid("image", f"image is not valid base64: {exc}", b64) from exc
    if len(data) > settings.max_image_bytes:
        raise invalid(
            "image",
            f"image is {len(data)} bytes, over the limit of {settings.max_image_bytes}",
            len(data),
            settings.max_image_bytes,
        )
    try:
        # The header alone gives the size; an oversized image is refused before its pixels.
        with Image.open(io.BytesIO(data), formats=images.DECODE_FORMATS) as probe:
            w, h = probe.size
    except Exception as exc:
        raise invalid("image", f"cannot decode image data: {images.why(exc)}", b64) from exc
    if w * h > settings.max_image_pixels:
        raise invalid(
            "image",
            f"image is {w}x{h} = {w * h} pixels, over the limit of {settings.max_image_pixels}",
            w * h,
            settings.max_image_pixels,
        )
    try:
        return images.decode_image(data, max_pixels=settings.max_image_pixels)
    except ValueError as exc:
        raise invalid("image", str(exc), b64) from exc


def to_recipe_params(
    req: GenerateRequest, tokenizer: Tokenizer, settings: Settings
) -> RecipeParams:
    check_prompt(req.prompt, tokenizer, settings)
    # The paper's defaults adapt to a server capped lower; an explicit ask over a cap is a 400.
    limited = caps.capped(req, settings)
    image = None
    if req.recipe in IMAGE_RECIPES:
        if req.image is None:
            raise ApiError(
                400,
                "missing_parameter",
                f"recipe {req.recipe!r} needs an input image",
                "image",
                None,
            )
        image = decode_image(req.image, settings)
        if req.recipe == "edit":
            caps.check_edit_size(image.size, settings)
    elif req.image is not None:
        raise invalid(
            "image",
            f"recipe {req.recipe!r} takes no input image (only {', '.join(IMAGE_RECIPES)})",
            req.image,
            list(IMAGE_RECIPES),
        )
    seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED)
    try:
        return RecipeParams(
            prompt=req.prompt,
            recipe=req.recipe,
            image=image,
            width=limited["width"],
            height=limited["height"],
            seed=seed,
            num_timesteps=limited["num_timesteps"],
            timestep_shift=req.timestep_shift,
            cfg_text_scale=req.cfg_text_scale,
            cfg_img_scale=req.cfg_img_scale,
            cfg_interval=req.cfg_interval,
            cfg_renorm_type=req.cfg_renorm_type,
            cfg_renorm_min=req.cfg_renorm_min,
            max_think_tokens=limited["max_think_tokens"],
            temperature=req.temperature,
            refine_rounds=limited["refine_rounds"],
            partial_images=limited["partial_images"],
        )
    except ValueError as exc:
        # The protocol's constraints mirror RecipeParams'; this is a backstop, not a path.
        raise ApiError(400, "invalid_request", str(exc)) from exc


def deadline_seconds(requested: float | None, settings: Settings) -> float:
    if requested is None:
        return settings.request_timeout
    if requested > settings.request_timeout:
        raise invalid(
            "timeout_s",
            f"timeout_s {requested} is over this server's limit of {settings.request_timeout}",
            requested,
            settings.request_timeout,
        )
    return requested
