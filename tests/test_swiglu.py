"""The fused `silu(gate) * up` kernel against eager torch, on CUDA (Triton)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from irg_engine.model import swiglu


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_rounds_like_eager_torch(dtype):
    if swiglu.triton is None:
        pytest.skip("Triton is not installed")
    gen = torch.Generator(device="cuda").manual_seed(0)
    # An odd size: the last block is partial.
    gate = torch.randn(1031, 4099, device="cuda", generator=gen).mul_(4).to(dtype)
    up = torch.randn(1031, 4099, device="cuda", generator=gen).to(dtype)
    assert swiglu._use_kernel(gate, up)
    fused = swiglu._fused(gate, up)
    eager = F.silu(gate) * up
    differ = (fused != eager).float().mean().item()
    print(f"{dtype}: {differ:.2e} of the entries differ from eager torch")
    assert not swiglu._STATE["broken"]
    # Same formula, same roundings: at most one ulp apart where libdevice and torch disagree.
    ulp = torch.finfo(dtype).eps * eager.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((fused - eager).abs() <= ulp).all()
    assert differ < 1e-3
