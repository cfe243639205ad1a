"""The fused kernels (Triton, CUDA) against the eager torch ops they replace: `fused.py`'s
elementwise ones and `fused_norm.py`'s RMSNorm fusions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from irg_engine.model import fused, fused_norm
from irg_engine.model.lm import rope_tables


def _report(name: str, fused_out: torch.Tensor, eager: torch.Tensor) -> float:
    differ = (fused_out != eager).float().mean().item()
    print(f"{name}: {differ:.2e} of the entries differ from eager torch")
    assert not fused._STATE["broken"]
    return differ


def _within_one_ulp(a: torch.Tensor, b: torch.Tensor) -> bool:
    ulp = torch.finfo(b.dtype).eps * b.abs().clamp_min(torch.finfo(b.dtype).tiny)
    return bool(((a - b).abs() <= ulp).all())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_kernel_rounds_like_eager_torch(dtype):
    if fused.triton is None:
        pytest.skip("Triton is not installed")
    gen = torch.Generator(device="cuda").manual_seed(0)
    # Odd sizes: rows of the joined gate|up do not align with blocks; the last block is partial.
    gate = torch.randn(1031, 4099, device="cuda", generator=gen).mul_(4).to(dtype)
    up = torch.randn(1031, 4099, device="cuda", generator=gen).to(dtype)
    gate_up = torch.cat([gate, up], dim=-1)
    assert fused.kernels_usable(gate_up)
    out, eager = fused._fused_silu_mul(gate_up), F.silu(gate) * up
    differ = _report(f"silu_mul {dtype}", out, eager)
    # Same formula, same roundings: at most one ulp apart where libdevice and torch disagree.
    assert _within_one_ulp(out, eager) and differ < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [28, 4])
def test_rope_kernel_rounds_like_eager_torch(dtype, heads):
    if fused.triton is None:
        pytest.skip("Triton is not installed")
    gen = torch.Generator(device="cuda").manual_seed(1)
    n = 777
    x = torch.randn(n, heads, 128, device="cuda", generator=gen).mul_(3).to(dtype)
    cos, sin = rope_tables(torch.arange(n, device="cuda") * 5, 128, 1e6)
    cos, sin = cos.to(dtype), sin.to(dtype)
    assert fused.kernels_usable(x, cos, sin)
    out, eager = fused._fused_rope(x, cos, sin, torch.empty_like(x)), fused.apply_rope(x, cos, sin)
    # Every product is rounded as eager torch rounds it (no FMA fusion): bitwise the same.
    assert _report(f"rope {dtype} heads={heads}", out, eager) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_rope_kernel_matches_rms_norm_then_rope(dtype):
    """QK-norm + RoPE in one kernel, reading q and k from the joined projection's rows, against
    `F.rms_norm` then the eager RoPE: only the order of the sum of squares differs. In float32
    a head whose 1/rms lands one rounding apart differs in every value by about that; in bf16
    the rounding to the dtype hides nearly all of it."""
    if fused.triton is None:
        pytest.skip("Triton is not installed")
    gen = torch.Generator(device="cuda").manual_seed(2)
    n, hq, hk, d = 777, 28, 4, 128
    joined = torch.randn(n, hq + 2 * hk, d, device="cuda", generator=gen).mul_(3).to(dtype)
    q, k = joined[:, :hq], joined[:, hq : hq + hk]
    norms = tuple(
        torch.randn(d, device="cuda", generator=gen).mul_(0.3).add_(1).to(dtype) for _ in "qk"
    )
    cos, sin = rope_tables(torch.arange(n, device="cuda") * 5, d, 1e6)
    cos, sin = cos.to(dtype), sin.to(dtype)
    assert fused_norm._norm_rope_fits(q, k, norms, cos, sin, None)
    out_q, out_k = torch.empty(n, hq, d, **_like(q)), torch.empty(n, hk, d, **_like(k))
    fused_norm._fused_norm_rope(q, k, norms, 1e-6, cos, sin, out_q, out_k)
    for name, out, x, w in (("q", out_q, q, norms[0]), ("k", out_k, k, norms[1])):
        eager = fused.apply_rope(F.rms_norm(x, (d,), w, eps=1e-6), cos, sin)
        differ = _report(f"norm+rope {name} {dtype}", out, eager)
        assert not fused.kernel_off("norm_rope")
        assert dtype == torch.float32 or differ < 0.05
        scale = eager.float().abs().amax(-1, keepdim=True)
        assert ((out.float() - eager.float()).abs() <= 4 * torch.finfo(dtype).eps * scale).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [3584, 64])
def test_add_norm_kernel_matches_add_then_rms_norm(dtype, width):
    """The residual sum is bitwise torch's add; its norm differs from `F.rms_norm` only by the
    order of the sum of squares."""
    if fused.triton is None:
        pytest.skip("Triton is not installed")
    gen = torch.Generator(device="cuda").manual_seed(3)
    x, y = (torch.randn(515, width, device="cuda", generator=gen).to(dtype) for _ in "xy")
    w = torch.randn(width, device="cuda", generator=gen).mul_(0.3).add_(1).to(dtype)
    total, normed = fused_norm._fused_add_norm(x, y, w, 1e-6)
    assert torch.equal(total, x + y)
    eager = F.rms_norm(x + y, (width,), w, eps=1e-6)
    differ = _report(f"add+norm {dtype} width={width}", normed, eager)
    assert not fused.kernel_off("add_norm")
    assert dtype == torch.float32 or differ < 0.05
    scale = eager.float().abs().amax(-1, keepdim=True)
    assert ((normed.float() - eager.float()).abs() <= 4 * torch.finfo(dtype).eps * scale).all()


def _like(t: torch.Tensor) -> dict:
    return {"dtype": t.dtype, "device": t.device}
