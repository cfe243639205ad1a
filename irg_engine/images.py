"""Image plumbing around the model, as pure functions: no model code and no state.

Data flows through this module in two directions:
- in: bytes -> `decode_image` (PIL RGB, upright by EXIF, transparency on white) ->
  `ResizeRule.resize` (VAE or ViT rule) -> `pil_to_tensor` ([3, H, W] in [-1, 1]) -> the VAE,
  whose latent `patchify_latent` cuts into tokens with `latent_position_ids`, or `vit_patches`
  with `vit_position_ids` for the ViT;
- out: generated latent tokens -> `unpatchify_latent` -> the VAE decoder -> `tensor_to_uint8`
  (truncating, as the reference does) -> `encode_png`.

The resize rule, the normalisation and the uint8 conversion reproduce the published BAGEL code
bit for bit (checked against the md5 sums of the golden data), because IRG feeds its own decoded
uint8 image back into the model and any pixel difference propagates.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError

# BAGEL's default pixel cap for its resize transforms.
DEFAULT_MAX_PIXELS = 14 * 14 * 9 * 1024
# Upload cap for `decode_image`; below PIL's own bomb warning threshold (about 89 Mpx).
DEFAULT_MAX_DECODE_PIXELS = 8192 * 8192

LATENT_PATCH = 2
MAX_LATENT_SIZE = 64
VIT_PATCH = 14
VIT_PER_SIDE = 70


@dataclass(slots=True)
class ResizeRule:
    """Aspect-preserving resize: long side <= max_side, short side >= min_side, sides a
    multiple of stride, area capped by max_pixels (BAGEL's MaxLongEdgeMinShortEdgeResize)."""

    max_side: int
    min_side: int
    stride: int
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        for name in ("max_side", "min_side", "stride", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_side > self.max_side:
            raise ValueError(f"min_side {self.min_side} exceeds max_side {self.max_side}")

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) an image of this size is resized to."""
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        # The short-side floor wins over the long-side ceiling here; the last step below then
        # pulls the long side back under max_side.
        scale = min(self.max_side / max(width, height), 1.0)
        scale = max(scale, self.min_side / min(width, height))
        new_w, new_h = self._apply_scale(width, height, scale)
        if new_w * new_h > self.max_pixels:
            # The reference scales the sides (not the area) by this pixel ratio; kept for parity.
            new_w, new_h = self._apply_scale(new_w, new_h, self.max_pixels / (new_w * new_h))
        if max(new_w, new_h) > self.max_side:
            new_w, new_h = self._apply_scale(new_w, new_h, self.max_side / max(new_w, new_h))
        return new_w, new_h

    def resize(self, image: Image.Image) -> Image.Image:
        """Resize with PIL bicubic (antialiased) to `target_size`; a new image either way."""
        size = self.target_size(*image.size)
        if size == image.size:
            return image.copy()
        return image.resize(size, Image.Resampling.BICUBIC)

    def _apply_scale(self, width: float, height: float, scale: float) -> tuple[int, int]:
        return self._snap(round(width * scale)), self._snap(round(height * scale))

    def _snap(self, value: float) -> int:
        # Python's round() (half to even) as in the reference, and never below one stride.
        return max(self.stride, int(round(value / self.stride) * self.stride))


VAE_RULE = ResizeRule(1024, 512, 16)
VIT_RULE = ResizeRule(980, 224, 14)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`; transparent pixels (RGBA, LA, PA, palette/tRNS) composite on white."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La")
    if not has_alpha and image.info.get("transparency") is None:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """Float32 [3, H, W] in [-1, 1]: ToTensor (x / 255) then Normalize(0.5, 0.5)."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r} (use to_rgb first)")
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
    # Same operations in the same order as torchvision, so the floats are bitwise identical.
    return pixels.permute(2, 0, 1).contiguous().float().div(255).sub(0.5).div(0.5)


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """uint8 [H, W, 3] of pixels [1, 3, H, W] or [3, H, W] in [-1, 1].

    Truncates toward zero rather than rounding: that is what the reference returns and what
    IRG feeds back into the model, so rounding would change the second image.
    """
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError(f"expected a single image, got batch of {x.shape[0]}")
        x = x[0]
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"expected pixels [3, H, W] or [1, 3, H, W], got {tuple(x.shape)}")
    scaled = (x.detach().float() * 0.5 + 0.5).clamp(0, 1) * 255
    return scaled.to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def encode_png(pixels: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG bytes of a uint8 [H, W, 3] array."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {pixels.dtype} {tuple(pixels.shape)}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(
        buffer, format="PNG", compress_level=compress_level
    )
    return buffer.getvalue()


# What uploaded bytes may be decoded as. PIL would also try formats that run outside programs
# on the data (EPS and PDF through Ghostscript) or that nobody sends as a picture.
DECODE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PPM")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_DECODE_PIXELS) -> Image.Image:
    """Decode image file bytes (PNG, JPEG, WebP, ...) to PIL RGB, upright.

    An EXIF orientation (a phone photo stored sideways with a "rotate on display" tag) is
    applied, as browsers and image viewers do, so the model sees the picture its sender saw.
    Raises ValueError for empty or undecodable data and for images over `max_pixels`; the size
    is read from the header, so an oversized image is rejected before its pixels are decoded.
    """
    if not data:
        raise ValueError("image data is empty")
    try:
        with Image.open(io.BytesIO(data), formats=DECODE_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ValueError(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels}"
                )
            image.load()
            return to_rgb(upright(image))
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image exceeds the decoder's pixel limit: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError) as exc:
        raise ValueError(f"cannot decode image data ({len(data)} bytes): {why(exc)}") from exc


_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def upright(image: Image.Image) -> Image.Image:
    """The image turned by its EXIF orientation; as stored where the EXIF cannot be read.
    (Not `ImageOps.exif_transpose`: it re-serialises the EXIF, which raises on malformed tags,
    and copies an image that needs no turn.)"""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return image
    method = _ORIENT.get(orientation) if isinstance(orientation, int) else None
    return image.transpose(method) if method is not None else image


def why(exc: Exception) -> str:
    """A decoder error in words for the client: PIL names the in-memory file object (an address)
    where it finds no known format."""
    if isinstance(exc, UnidentifiedImageError):
        return f"not an image in a known format ({', '.join(DECODE_FORMATS)})"
    return str(exc)


def patchify_latent(latent: torch.Tensor, p: int = LATENT_PATCH) -> torch.Tensor:
    """Latent [C, p*h, p*w] or [1, C, p*h, p*w] -> tokens [h*w, p*p*C] in (p, q, c) order,
    one row per patch in row-major patch order."""
    if latent.dim() == 4:
        if latent.shape[0] != 1:
            raise ValueError(f"expected a single latent, got batch of {latent.shape[0]}")
        latent = latent[0]
    if latent.dim() != 3:
        raise ValueError(f"expected a latent [C, H, W], got {tuple(latent.shape)}")
    c, height, width = latent.shape
    if height % p or width % p:
        raise ValueError(f"latent sides {height}x{width} are not multiples of {p}")
    h, w = height // p, width // p
    tokens = latent.reshape(c, h, p, w, p).permute(1, 3, 2, 4, 0)
    return tokens.reshape(h * w, p * p * c)


def unpatchify_latent(tokens: torch.Tensor, h: int, w: int, p: int = LATENT_PATCH) -> torch.Tensor:
    """Tokens [h*w, p*p*C] -> latent [1, C, p*h, p*w]; the inverse of `patchify_latent`."""
    if tokens.dim() != 2 or tokens.shape[0] != h * w or tokens.shape[1] % (p * p):
        raise ValueError(f"expected tokens [{h}*{w}, {p}*{p}*C], got {tuple(tokens.shape)}")
    c = tokens.shape[1] // (p * p)
    latent = tokens.reshape(h, w, p, p, c).permute(4, 0, 2, 1, 3)
    return latent.reshape(1, c, h * p, w * p)


def grid_position_ids(h: int, w: int, per_side: int) -> torch.Tensor:
    """int64 [h*w] ids row * per_side + col of an h x w grid inside a per_side-wide table."""
    if not (1 <= h <= per_side and 1 <= w <= per_side):
        raise ValueError(f"grid {h}x{w} does not fit a {per_side}x{per_side} position table")
    rows = torch.arange(h, dtype=torch.int64)[:, None]
    cols = torch.arange(w, dtype=torch.int64)[None, :]
    return (rows * per_side + cols).flatten()


def latent_position_ids(h: int, w: int, max_latent_size: int = MAX_LATENT_SIZE) -> torch.Tensor:
    """Ids into `latent_pos_embed` for an h x w grid of latent tokens."""
    return grid_position_ids(h, w, max_latent_size)


def vit_patches(x: torch.Tensor, patch: int = VIT_PATCH) -> torch.Tensor:
    """Pixels [C, H, W] -> [N, patch*patch*C] in (row-in-patch, col-in-patch, channel) order,
    one row per patch in row-major patch order."""
    if x.dim() != 3:
        raise ValueError(f"expected pixels [C, H, W], got {tuple(x.shape)}")
    c, height, width = x.shape
    if height % patch or width % patch:
        raise ValueError(f"image sides {height}x{width} are not multiples of {patch}")
    h, w = height // patch, width // patch
    patches = x.reshape(c, h, patch, w, patch).permute(1, 3, 2, 4, 0)
    return patches.reshape(h * w, patch * patch * c)


def vit_position_ids(h_patches: int, w_patches: int, per_side: int = VIT_PER_SIDE) -> torch.Tensor:
    """Ids into the ViT position tables (and `vit_pos_embed`) for an h x w patch grid."""
    return grid_position_ids(h_patches, w_patches, per_side)
