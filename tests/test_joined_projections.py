"""An expert's joined q/k/v and gate/up projections: the state dict shows the published parts,
loading parts joins them, and the forward computes what the separate projections would."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from irg_engine.config import LMConfig
from irg_engine.model.lm import Expert, part_rows

CFG = LMConfig(
    hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=48,
    vocab_size=10, qkv_bias=True,
)  # fmt: skip
PUBLISHED = [
    "input_norm.weight",
    *(f"{x}_proj.{kind}" for x in "qkv" for kind in ("weight", "bias")),
    "o_proj.weight",
    "q_norm.weight",
    "k_norm.weight",
    "post_norm.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
]


def random_parts(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in Expert(CFG).state_dict().items()}
    return {k: torch.randn(shape, generator=gen) for k, shape in shapes.items()}


def test_state_dict_names_the_published_parts_as_views_of_the_joined_tensors():
    expert = Expert(CFG)
    state = expert.state_dict()
    assert list(state) == PUBLISHED
    d, q, kv = CFG.head_dim, CFG.num_heads * CFG.head_dim, CFG.num_kv_heads * CFG.head_dim
    assert state["k_proj.weight"].shape == (kv, CFG.hidden_size) and d * CFG.num_heads == q
    joined = expert.qkv_proj.weight
    assert state["k_proj.weight"].data_ptr() == joined[q].data_ptr()  # a view, not a copy
    assert torch.equal(state["v_proj.bias"], expert.qkv_proj.bias[q + kv :])
    assert torch.equal(state["up_proj.weight"], expert.gate_up_proj.weight[CFG.intermediate_size :])


def test_loading_parts_joins_them_and_the_forward_matches_separate_projections():
    parts = random_parts(0)
    expert = Expert(CFG)
    expert.load_state_dict(parts, strict=True)
    assert all(torch.equal(expert.state_dict()[k], v) for k, v in parts.items())

    x = torch.randn(7, CFG.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # RoPE at position 0 (cos 1, sin 0) leaves the normed heads as they are.
        rope = (torch.ones(7, CFG.head_dim), torch.zeros(7, CFG.head_dim))
        q, k, v = expert.qkv(x, CFG.num_heads, CFG.num_kv_heads, rope)
        h = expert.input_norm(x)

        def proj(name: str) -> torch.Tensor:
            return F.linear(h, parts[f"{name}.weight"], parts[f"{name}.bias"]).unflatten(
                -1, (-1, 8)
            )

        assert torch.allclose(q, expert.q_norm(proj("q_proj")), atol=1e-6)
        assert torch.allclose(k, expert.k_norm(proj("k_proj")), atol=1e-6)
        assert torch.allclose(v, proj("v_proj"), atol=1e-6)

        attn = torch.randn(7, CFG.num_heads * CFG.head_dim)
        mid = x + F.linear(attn, parts["o_proj.weight"])
        h2 = expert.post_norm(mid)
        mlp = F.silu(F.linear(h2, parts["gate_proj.weight"])) * F.linear(
            h2, parts["up_proj.weight"]
        )
        expected = mid + F.linear(mlp, parts["down_proj.weight"])
        assert torch.allclose(expert.finish(x, attn), expected, atol=1e-5)


def test_part_rows_place_every_part_where_the_state_dict_finds_it():
    """The checkpoint loader copies each part into these rows; reading the state dict back
    must give the part."""

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = torch.nn.ModuleList([Expert(CFG), Expert(CFG)])

    model, parts = Holder(), random_parts(2)
    rows = part_rows(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for i in range(2):
            for name, t in parts.items():
                full = f"experts.{i}.{name}"
                if full in rows:
                    target, start, end = rows[full]
                    params[target][start:end].copy_(t)
    state = model.state_dict()
    joined = {n.split(".", 2)[2] for n in rows}
    assert joined == {k for k in PUBLISHED if k.split(".")[0].endswith("_proj")} - {
        "o_proj.weight",
        "down_proj.weight",
    }
    for i in range(2):
        for name in joined:
            assert torch.equal(state[f"experts.{i}.{name}"], parts[name])
