"""The flow-matching step rule: schedule, gating, guidance combination, renorms, Euler."""

from __future__ import annotations

import pytest
import torch

from irg_engine import flow


def test_schedule_is_shifted_linspace_without_the_final_zero():
    ts, dts = flow.schedule(8, 3.0)
    raw = torch.linspace(1, 0, 8)
    shifted = 3 * raw / (1 + 2 * raw)
    assert ts.tolist() == shifted[:-1].tolist()
    assert dts.tolist() == (shifted[:-1] - shifted[1:]).tolist()
    assert ts[0] == 1.0 and len(ts) == 7
    assert float(dts.sum()) == pytest.approx(1.0)


def test_schedule_rejects_too_few_steps():
    with pytest.raises(ValueError, match="num_timesteps"):
        flow.schedule(1, 3.0)


def test_guidance_gating_interval_is_open_below_closed_above():
    g = flow.Guidance(text_scale=4.0, img_scale=2.0, interval=(0.4, 1.0))
    assert flow.guidance_active(1.0, g) == (True, True)
    assert flow.guidance_active(0.4, g) == (False, False)
    assert flow.guidance_active(0.41, g) == (True, True)
    assert flow.guidance_active(0.5, flow.Guidance(text_scale=1.0, img_scale=1.0)) == (False, False)


def test_guidance_validates():
    with pytest.raises(ValueError, match="renorm_type"):
        flow.Guidance(renorm_type="nope")
    with pytest.raises(ValueError, match="interval"):
        flow.Guidance(interval=(0.8, 0.2))


def _branches(seed=0, tokens=6, ch=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, ch, generator=g) for _ in range(3)]


def test_global_renorm_matches_formula():
    c, tf, imf = _branches()
    g = flow.Guidance(text_scale=4.0, img_scale=2.0, renorm_type="global", renorm_min=0.0)
    u = tf + 4.0 * (c - tf)
    u = imf + 2.0 * (u - imf)
    expected = u * (c.norm() / (u.norm() + 1e-8)).clamp(0.0, 1.0)
    torch.testing.assert_close(flow.combine_guidance(c, tf, imf, g), expected)


def test_channel_renorm_is_per_token():
    c, tf, _ = _branches(1)
    g = flow.Guidance(text_scale=3.0, renorm_type="channel")
    u = tf + 3.0 * (c - tf)
    scale = (c.norm(dim=-1, keepdim=True) / (u.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0, 1)
    torch.testing.assert_close(flow.combine_guidance(c, tf, None, g), u * scale)


def test_text_channel_renorms_text_step_only():
    c, tf, imf = _branches(2)
    g = flow.Guidance(text_scale=4.0, img_scale=2.0, renorm_type="text_channel", renorm_min=0.2)
    u = tf + 4.0 * (c - tf)
    scale = (c.norm(dim=-1, keepdim=True) / (u.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0.2, 1)
    expected = imf + 2.0 * (u * scale - imf)
    torch.testing.assert_close(flow.combine_guidance(c, tf, imf, g), expected)


def test_no_branches_returns_the_conditional_velocity():
    c, _, _ = _branches(3)
    assert flow.combine_guidance(c, None, None, flow.Guidance()) is c


def test_global_norm_of_one_image_does_not_see_another():
    # Two images combined separately must equal each one combined alone (per-request renorm).
    a, b = _branches(4), _branches(5)
    g = flow.Guidance(text_scale=4.0)
    alone = flow.combine_guidance(a[0], a[1], None, g)
    scaled_b = [x * 100 for x in b]
    flow.combine_guidance(scaled_b[0], scaled_b[1], None, g)
    torch.testing.assert_close(flow.combine_guidance(a[0], a[1], None, g), alone)


def test_euler_step_moves_against_velocity():
    x = torch.ones(2, 3)
    v = torch.full((2, 3), 2.0)
    torch.testing.assert_close(flow.euler_step(x, v, 0.25), torch.full((2, 3), 0.5))
