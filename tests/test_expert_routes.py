"""The MoT layer's two ways of routing rows to experts give the same layer output: index
gather/scatter (any layout; the reference recipes) and the generation expert on a slice of the
step's tail (`ExpertRoutes.gen_from`, the engine's packed steps)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from irg_engine.config import LMConfig
from irg_engine.model.lm import GEN, UND, ExpertRoutes, LanguageModel


class FullAttention:
    """Every row attends to every row (the plan's job is not under test here)."""

    def attend(self, layer, q, k, v):
        group = q.shape[1] // k.shape[1]
        k, v = (t.repeat_interleave(group, dim=1).transpose(0, 1) for t in (k, v))
        return F.scaled_dot_product_attention(q.transpose(0, 1), k, v).transpose(0, 1)


def test_slice_routing_matches_index_routing():
    torch.manual_seed(0)
    cfg = LMConfig(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
        vocab_size=100,
    )  # fmt: skip
    model = LanguageModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # experts must differ for the test to mean anything
            p.normal_(0.0, 0.2)
    # 5 text rows, then two image blocks: [marker, 6 latents, marker] and [marker, 4, marker].
    gen = torch.zeros(19, dtype=torch.bool)
    gen[6:12] = gen[14:18] = True
    x = torch.randn(19, cfg.hidden_size)
    positions = torch.tensor([0, 1, 2, 3, 4] + [5] * 8 + [6] * 6)
    by_index = ExpertRoutes.from_mask(gen)
    by_slice = ExpertRoutes(by_index.und, None, gen_from=5)
    with torch.no_grad():
        a = model(x, positions, by_index, FullAttention())
        b = model(x, positions, by_slice, FullAttention())
        # The experts really differ: routing everything to one expert changes the output.
        c = model(x, positions, ExpertRoutes(None, None, UND), FullAttention())
        d = model(x, positions, ExpertRoutes(None, None, GEN), FullAttention())
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a, c, atol=1e-3) and not torch.allclose(a, d, atol=1e-3)
