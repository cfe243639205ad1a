"""Tests for irg_engine.model.vae against the golden tiny FLUX autoencoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from irg_engine.images import VAE_RULE, pil_to_tensor, tensor_to_uint8, unpatchify_latent
from irg_engine.model.vae import AutoEncoder, VaeConfig

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
CHECKPOINT = GOLDEN / "checkpoint"
TOL = 1e-4


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _require_golden() -> None:
    if not (CHECKPOINT / "ae.safetensors").exists():
        pytest.skip(f"golden data not found at {GOLDEN}")


def _golden(case: str) -> dict[str, torch.Tensor]:
    _require_golden()
    from safetensors.torch import load_file

    return load_file(str(GOLDEN / case / "expected.safetensors"))


def _tiny_config() -> VaeConfig:
    info = json.loads((CHECKPOINT / "tiny_model_info.json").read_text())
    return VaeConfig.from_dict(info["vae_params"])


@pytest.fixture(scope="module")
def ae() -> AutoEncoder:
    _require_golden()
    from safetensors.torch import load_file

    state = load_file(str(CHECKPOINT / "ae.safetensors"))
    # Build on meta and assign, as the checkpoint loader does.
    with torch.device("meta"):
        model = AutoEncoder(_tiny_config())
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# --- config and structure (no golden data needed) -----------------------------------------------


def test_config_defaults_are_the_7b_model() -> None:
    cfg = VaeConfig()
    assert (cfg.ch, cfg.ch_mult, cfg.z_channels) == (128, (1, 2, 4, 4), 16)
    assert (cfg.scale_factor, cfg.shift_factor) == (0.3611, 0.1159)


def test_config_validation() -> None:
    assert VaeConfig(ch_mult=[1, 2, 2, 2]).ch_mult == (1, 2, 2, 2)
    with pytest.raises(ValueError, match="downsample"):
        VaeConfig(ch_mult=(1, 2))
    with pytest.raises(ValueError, match="groups"):
        VaeConfig(ch=48)
    with pytest.raises(ValueError, match="ch_mult"):
        VaeConfig(ch_mult=())


def test_7b_model_builds_on_meta() -> None:
    with torch.device("meta"):
        model = AutoEncoder(VaeConfig())
    # The published FLUX autoencoder has 83.8M parameters in 244 tensors.
    assert sum(p.numel() for p in model.parameters()) == 83_819_683
    assert len(model.state_dict()) == 244


def test_small_random_round_trip_shapes() -> None:
    torch.manual_seed(0)
    model = AutoEncoder(VaeConfig(ch=32, ch_mult=(1, 2), downsample=2)).eval()
    x = torch.rand(2, 3, 8, 12) * 2 - 1
    with torch.no_grad():
        assert model.encode_moments(x).shape == (2, 32, 4, 6)
        z = model.encode(x)
        assert z.shape == (2, 16, 4, 6)
        assert model.decode(z).shape == (2, 3, 8, 12)


def test_shape_errors() -> None:
    model = AutoEncoder(VaeConfig(ch=32, ch_mult=(1, 2), downsample=2))
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(torch.zeros(1, 3, 7, 8))
    with pytest.raises(ValueError, match="pixels"):
        model.encode(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="latents"):
        model.decode(torch.zeros(1, 4, 4, 4))


# --- golden tiny model ---------------------------------------------------------------------------


def test_state_dict_keys_match_checkpoint(ae: AutoEncoder) -> None:
    from safetensors import safe_open

    with safe_open(str(CHECKPOINT / "ae.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert set(ae.state_dict()) == names
    assert all(p.device.type == "cpu" for p in ae.parameters())


def test_golden_vae_case(ae: AutoEncoder) -> None:
    golden = _golden("vae")
    x = golden["image_uint8"].permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)[None]
    with torch.no_grad():
        moments = ae.encode_moments(x)
        latent = ae.encode(x)
        decoded = ae.decode(golden["latent"])
    assert rel_l2(moments, golden["encoder_moments"]) < TOL
    assert rel_l2(latent, golden["latent"]) < TOL
    assert rel_l2(decoded, golden["decoded"]) < TOL
    diff = np.abs(tensor_to_uint8(decoded).astype(int) - golden["decoded_uint8"].numpy())
    assert diff.max() <= 1 and (diff > 0).sum() <= 5


def test_sampled_encode(ae: AutoEncoder) -> None:
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    cfg = ae.config
    with torch.no_grad():
        mean, logvar = ae.encode_moments(x).chunk(2, dim=1)
        a = ae.encode(x, generator=torch.Generator().manual_seed(3))
        b = ae.encode(x, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    expected = cfg.scale_factor * (mean + torch.exp(0.5 * logvar) * noise - cfg.shift_factor)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, expected)


def test_resized_reencode_matches_edit_and_irg(ae: AutoEncoder) -> None:
    # End to end with images.py: uint8 -> VAE resize -> [-1, 1] -> posterior-mean latent.
    for case, image_key, latent_key in [
        ("edit", "image_uint8", "vae_context_latent"),
        ("irg", "image1.uint8", "image1_context.vae_latent"),
    ]:
        golden = _golden(case)
        image = VAE_RULE.resize(Image.fromarray(golden[image_key].numpy()))
        with torch.no_grad():
            latent = ae.encode(pil_to_tensor(image)[None])
        assert rel_l2(latent, golden[latent_key]) < TOL, case


def test_irg_decode_of_final_latents(ae: AutoEncoder) -> None:
    golden = _golden("irg")
    for name in ("image1", "image2"):
        with torch.no_grad():
            decoded = ae.decode(unpatchify_latent(golden[f"{name}.final_latent_tokens"], 4, 4))
        assert rel_l2(decoded, golden[f"{name}.decoded"]) < TOL
        diff = np.abs(tensor_to_uint8(decoded).astype(int) - golden[f"{name}.uint8"].numpy())
        assert diff.max() <= 1 and (diff > 0).sum() <= 5
