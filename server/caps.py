"""The server's caps on the cost of one request: which request field each setting bounds, the check,
and the OpenAPI schema that advertises them.

The request models (`protocol.py`) hold the model's own limits; an operator caps lower with the
settings (`max_image_side`, `max_timesteps`, `max_think_tokens`, `max_refine_rounds`,
`max_partial_images`). A value the client sets over its cap is a 400 naming the parameter, the
value and the cap; an unset one takes the smaller of its default and the cap, so the paper's
defaults (1024x1024, 50 timesteps...) still work on a server capped lower. An edit draws its image
at its input's size after the model's resize rule, so that size is held to `max_image_side` too.
The schema served at /openapi.json says the caps in force, so a client (or a fuzzer) reading it
asks only for what this server takes.
"""

from __future__ import annotations

from pydantic import BaseModel

from irg_engine import images
from server.errors import invalid
from server.protocol import MIN_SIDE
from server.settings import Settings

# request field -> the setting that caps it
CAPS = {
    "width": "max_image_side",
    "height": "max_image_side",
    "num_timesteps": "max_timesteps",
    "max_think_tokens": "max_think_tokens",
    "refine_rounds": "max_refine_rounds",
    "partial_images": "max_partial_images",
}
# The request models whose fields the caps bound, by their name in the schema.
CAPPED_MODELS = ("GenerateRequest", "ImagesRequest")


def capped(req: BaseModel, settings: Settings) -> dict[str, int]:
    """The request's capped fields with their values in force; a set one over its cap is a 400."""
    out = {}
    for name, setting in CAPS.items():
        if name not in type(req).model_fields:
            continue
        value, limit = getattr(req, name), getattr(settings, setting)
        if name not in req.model_fields_set:
            value = min(value, limit)
        elif value > limit:
            message = f"{name} {value} is over this server's limit of {limit}"
            raise invalid(name, message, value, limit)
        out[name] = value
    return out


def size_rule(settings: Settings) -> str:
    """How an images request's `size` is written on this server."""
    return f"WIDTHxHEIGHT, multiples of 16 in {MIN_SIDE}..{settings.max_image_side}, or auto"


def check_edit_size(size: tuple[int, int], settings: Settings) -> None:
    """An edit's input image, of this (width, height), must not make a too large output."""
    w, h = images.VAE_RULE.target_size(*size)
    if max(w, h) > settings.max_image_side:
        raise invalid(
            "image",
            f"an edit draws at its input's size after the model's resize rule, {w}x{h} for this "
            f"{size[0]}x{size[1]} image: a side of {max(w, h)} is over this server's limit of "
            f"{settings.max_image_side}",
            max(w, h),
            settings.max_image_side,
        )


def advertise(schema: dict, settings: Settings) -> dict:
    """Writes the caps in force into an OpenAPI schema (in place) and returns it."""
    components = schema.get("components", {}).get("schemas", {})
    for model in CAPPED_MODELS:
        properties = components.get(model, {}).get("properties", {})
        for name, setting in CAPS.items():
            prop = properties.get(name)
            if prop is None:
                continue
            limit = getattr(settings, setting)
            prop["maximum"] = limit
            if isinstance(prop.get("default"), int):
                prop["default"] = min(prop["default"], limit)
        n = properties.get("n")
        if n is not None:  # an images request's n requests are admitted together
            n["maximum"] = min(n["maximum"], settings.max_in_flight)
        size = properties.get("size")
        if size is not None:
            side = settings.max_image_side
            size["default"] = f"{side}x{side}"
            size["description"] = size_rule(settings)
    return schema
