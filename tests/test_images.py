"""Tests for irg_engine.images: resize rule, normalisation, uint8 conversion, PNG, patchify."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from irg_engine.images import (
    VAE_RULE,
    VIT_RULE,
    ResizeRule,
    decode_image,
    encode_png,
    latent_position_ids,
    patchify_latent,
    pil_to_tensor,
    tensor_to_uint8,
    to_rgb,
    unpatchify_latent,
    vit_patches,
    vit_position_ids,
)

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"


def _golden(case: str) -> dict[str, torch.Tensor]:
    path = GOLDEN / case / "expected.safetensors"
    if not path.exists():
        pytest.skip(f"golden data not found at {path}")
    from safetensors.torch import load_file

    return load_file(str(path))


def _md5(image: Image.Image) -> str:
    return hashlib.md5(np.asarray(image).tobytes()).hexdigest()


def _pil(pixels: torch.Tensor) -> Image.Image:
    return Image.fromarray(pixels.numpy())


# --- resize rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "size", "expected"),
    [
        (VAE_RULE, (80, 64), (640, 512)),  # small images are upsampled to the short-side floor
        (VAE_RULE, (2000, 1000), (1024, 512)),
        (VAE_RULE, (1024, 1024), (1024, 1024)),
        (VAE_RULE, (1, 1), (512, 512)),
        (VAE_RULE, (1000, 3000), (336, 1024)),  # long-side cap beats the short-side floor
        (VAE_RULE, (4000, 500), (1024, 128)),  # pixel cap, then long-side cap
        (VIT_RULE, (84, 56), (336, 224)),
        (VIT_RULE, (80, 64), (280, 224)),
        (VIT_RULE, (640, 512), (644, 518)),
        (VIT_RULE, (3000, 100), (980, 28)),
        (ResizeRule(1024, 512, 16, max_pixels=300_000), (1000, 1000), (304, 304)),
    ],
)
def test_target_size(rule: ResizeRule, size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert rule.target_size(*size) == expected


def test_target_size_is_a_stride_multiple() -> None:
    for w in range(1, 3000, 97):
        for h in (7, 333, 1500, 2999):
            for rule in (VAE_RULE, VIT_RULE):
                new_w, new_h = rule.target_size(w, h)
                assert new_w % rule.stride == 0 and new_h % rule.stride == 0
                assert max(new_w, new_h) <= rule.max_side


def test_resize_rule_validation() -> None:
    with pytest.raises(ValueError, match="min_side"):
        ResizeRule(100, 200, 16)
    with pytest.raises(ValueError, match="stride"):
        ResizeRule(100, 50, 0)
    with pytest.raises(ValueError, match="positive"):
        VAE_RULE.target_size(0, 10)


def test_resize_keeps_same_size_images() -> None:
    image = Image.new("RGB", (1024, 512), (10, 20, 30))
    out = VAE_RULE.resize(image)
    assert out.size == (1024, 512) and out is not image
    assert np.array_equal(np.asarray(out), np.asarray(image))


def test_resize_md5_edit_case() -> None:
    golden = _golden("edit")
    vae_input = VAE_RULE.resize(_pil(golden["image_uint8"]))
    assert vae_input.size == (640, 512)
    assert _md5(vae_input) == "b5f8138491fa3ea4deeeda04bd2882fb"
    # In editing the ViT input is the VAE-resized image resized again.
    vit_input = VIT_RULE.resize(vae_input)
    assert vit_input.size == (644, 518)
    assert _md5(vit_input) == "74f27d8bfad158a1b6ab822eb8131d27"


def test_resize_md5_irg_case() -> None:
    image = _pil(_golden("irg")["image1.uint8"])
    # In IRG both transforms start from the decoded 64x64 image.
    assert _md5(VAE_RULE.resize(image)) == "167c5b43a3985f29cdc66b698adcef47"
    assert _md5(VIT_RULE.resize(image)) == "ef8748e6709e933bf740269af017c45c"


def test_resize_vit_case_pixels() -> None:
    golden = _golden("vit")
    resized = VIT_RULE.resize(_pil(golden["image_uint8"]))
    assert np.array_equal(np.asarray(resized), golden["vit_input_resized_uint8"].numpy())


# --- colour, normalisation, uint8 ----------------------------------------------------------------


def test_to_rgb_composites_rgba_on_white() -> None:
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
    rgba.putpixel((1, 0), (200, 0, 0, 255))  # opaque stays
    out = to_rgb(rgba)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (200, 0, 0)


def test_to_rgb_half_transparent_and_la() -> None:
    half = to_rgb(Image.new("RGBA", (1, 1), (0, 0, 0, 128)))
    assert all(126 <= v <= 128 for v in half.getpixel((0, 0)))
    la = to_rgb(Image.new("LA", (1, 1), (0, 0)))
    assert la.getpixel((0, 0)) == (255, 255, 255)


def test_to_rgb_palette_with_transparency() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    out = to_rgb(palette)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (10, 20, 30)


def test_to_rgb_plain_conversion() -> None:
    assert to_rgb(Image.new("L", (1, 1), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_pil_to_tensor_range_and_layout() -> None:
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[0, 0] = (0, 128, 255)
    x = pil_to_tensor(Image.fromarray(pixels))
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    assert x[:, 0, 0].tolist() == pytest.approx([-1.0, 128 / 255 * 2 - 1, 1.0], abs=1e-6)
    with pytest.raises(ValueError, match="RGB"):
        pil_to_tensor(Image.new("L", (1, 1)))


def test_tensor_to_uint8_truncates() -> None:
    values = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0])
    x = values.view(1, 1, -1).expand(3, 1, -1)
    out = tensor_to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 6, 3)
    # 0.0 -> 127.5 and 0.999 -> 254.87 both truncate down.
    assert out[0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]
    assert np.array_equal(tensor_to_uint8(x[None]), out)


def test_tensor_to_uint8_shape_errors() -> None:
    with pytest.raises(ValueError, match="single image"):
        tensor_to_uint8(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="3, H, W"):
        tensor_to_uint8(torch.zeros(4, 4, 3))


def test_tensor_to_uint8_matches_golden() -> None:
    golden = _golden("vae")
    assert np.array_equal(tensor_to_uint8(golden["decoded"]), golden["decoded_uint8"].numpy())


def test_pil_to_tensor_tensor_to_uint8_round_trip() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = pil_to_tensor(Image.fromarray(pixels))
    back = tensor_to_uint8(x)
    # Truncation may lose one level where v/255*2-1 lands a hair below the exact value.
    assert np.abs(back.astype(int) - pixels.astype(int)).max() <= 1


# --- PNG -----------------------------------------------------------------------------------------


def test_png_round_trip() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    data = encode_png(pixels)
    assert data.startswith(b"\x89PNG")
    image = decode_image(data)
    assert image.mode == "RGB" and image.size == (13, 9)
    assert np.array_equal(np.asarray(image), pixels)


def test_encode_png_rejects_bad_arrays() -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4), dtype=np.uint8))


def test_decode_image_composites_transparency() -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (3, 2), (0, 0, 0, 0)).save(buffer, format="PNG")
    image = decode_image(buffer.getvalue())
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)


def test_decode_image_applies_exif_orientation() -> None:
    # Stored 3 wide and 2 high with a red left column; tag 6 means "rotate 90 degrees clockwise
    # to display", so the upright image is 2 wide, 3 high, red along its top row.
    stored = np.zeros((2, 3, 3), dtype=np.uint8)
    stored[:, 0] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="PNG", exif=exif)
    upright = np.asarray(decode_image(buffer.getvalue()))
    assert upright.shape == (3, 2, 3)
    assert (upright[0] == (255, 0, 0)).all() and not upright[1:, :, 0].any()


def test_decode_image_survives_malformed_exif() -> None:
    # An ASCII tag renumbered as SubIFDs (which PIL reads as offsets): rewriting such an EXIF, as
    # ImageOps.exif_transpose does after turning an image, raised struct.error (a 500 upstream).
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010E] = "desc"
    raw = exif.tobytes()
    malformed = raw.replace(b"\x01\x0e\x00\x02", b"\x01\x4a\x00\x02")
    assert malformed != raw
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), (200, 0, 0)).save(buffer, format="JPEG", exif=malformed)
    assert decode_image(buffer.getvalue()).size == (4, 6)  # still turned upright


def test_decode_image_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        decode_image(b"")
    with pytest.raises(ValueError, match="cannot decode"):
        decode_image(b"definitely not an image")
    truncated = encode_png(np.full((64, 64, 3), 7, dtype=np.uint8))[:60]
    with pytest.raises(ValueError, match="cannot decode"):
        decode_image(truncated)
    big = encode_png(np.zeros((100, 100, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="over the limit"):
        decode_image(big, max_pixels=5_000)


# --- patchify ------------------------------------------------------------------------------------


def test_patchify_latent_order() -> None:
    latent = torch.arange(16 * 4 * 6, dtype=torch.float32).reshape(16, 4, 6)
    tokens = patchify_latent(latent)
    assert tokens.shape == (6, 64)
    # Token 1 is patch (row 0, col 1); its value (p, q, c) sits at (p * 2 + q) * 16 + c.
    for p in range(2):
        for q in range(2):
            for c in (0, 5, 15):
                assert tokens[1, (p * 2 + q) * 16 + c] == latent[c, p, 2 + q]


def test_patchify_round_trip() -> None:
    latent = torch.randn(1, 16, 8, 12)
    tokens = patchify_latent(latent)
    assert torch.equal(patchify_latent(latent[0]), tokens)
    assert torch.equal(unpatchify_latent(tokens, 4, 6), latent)


def test_patchify_errors() -> None:
    with pytest.raises(ValueError, match="multiples"):
        patchify_latent(torch.zeros(16, 3, 4))
    with pytest.raises(ValueError, match="single latent"):
        patchify_latent(torch.zeros(2, 16, 4, 4))
    with pytest.raises(ValueError, match="tokens"):
        unpatchify_latent(torch.zeros(5, 64), 2, 2)


def test_patchify_matches_golden() -> None:
    golden = _golden("vae")
    assert torch.equal(patchify_latent(golden["latent"]), golden["latent_tokens"])
    assert torch.equal(unpatchify_latent(golden["latent_tokens"], 4, 6), golden["latent"])
    assert torch.equal(latent_position_ids(4, 6), golden["vae_block.latent_position_ids"])


def test_position_ids() -> None:
    assert latent_position_ids(2, 3).tolist() == [0, 1, 2, 64, 65, 66]
    assert vit_position_ids(2, 2).tolist() == [0, 1, 70, 71]
    assert latent_position_ids(2, 2).dtype == torch.int64
    with pytest.raises(ValueError, match="position table"):
        latent_position_ids(65, 1)
    with pytest.raises(ValueError, match="position table"):
        vit_position_ids(1, 71)


def test_vit_position_ids_match_golden() -> None:
    assert torch.equal(vit_position_ids(16, 24), _golden("vit")["vit_position_ids"])
    irg = _golden("irg")
    assert torch.equal(vit_position_ids(16, 16), irg["image1_context.vit_position_ids"])
    assert torch.equal(latent_position_ids(32, 32), irg["image1_context.vae_position_ids"])


def test_vit_patches_order() -> None:
    x = torch.randn(3, 28, 42)
    patches = vit_patches(x)
    assert patches.shape == (6, 588)
    # Patch 4 is (row 1, col 1); value (i, j, c) sits at (i * 14 + j) * 3 + c.
    for i, j, c in [(0, 0, 0), (3, 11, 2), (13, 13, 1)]:
        assert patches[4, (i * 14 + j) * 3 + c] == x[c, 14 + i, 14 + j]
    with pytest.raises(ValueError, match="multiples"):
        vit_patches(torch.zeros(3, 20, 28))
