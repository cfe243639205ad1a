"""The token sampler: the right distribution, across block boundaries, reproducible, and the
same token for a row alone or in a batch."""

from __future__ import annotations

import pytest
import torch

from irg_engine.sampler import (
    CDF_BLOCK,
    LOG2E,
    NO_TOKEN,
    sample_rows,
    sample_token,
    softmax_weights,
)


def test_draws_follow_the_softmax_across_blocks():
    # Mass sits in the first block, across a block boundary and in the short last block.
    n = 3 * CDF_BLOCK + 100
    logits = torch.full((n,), -30.0)
    hot = [5, CDF_BLOCK - 1, CDF_BLOCK, 2 * CDF_BLOCK + 7, n - 1]
    logits[hot] = torch.tensor([1.0, 0.0, 0.5, -0.5, 2.0])
    temperature = 0.7
    expected = torch.softmax(logits / temperature, 0)[hot]
    g = torch.Generator().manual_seed(0)
    draws = [sample_token(logits, temperature, g) for _ in range(6000)]
    assert set(draws) <= set(hot)
    counts = torch.tensor([draws.count(i) for i in hot], dtype=torch.float64)
    observed = counts / counts.sum()
    spread = (expected * (1 - expected) / len(draws)).sqrt()
    assert ((observed - expected).abs() < 5 * spread + 1e-3).all(), (observed, expected)


def test_same_generator_state_gives_the_same_tokens_and_zero_temperature_is_greedy():
    logits = torch.randn(152_064, generator=torch.Generator().manual_seed(1)) * 4
    a = [sample_token(logits, 1.0, torch.Generator().manual_seed(s)) for s in range(20)]
    b = [sample_token(logits, 1.0, torch.Generator().manual_seed(s)) for s in range(20)]
    assert a == b and len(set(a)) > 1
    assert sample_token(logits, 0.0, torch.Generator()) == int(logits.argmax())


def test_a_row_draws_the_same_token_alone_and_in_a_batch():
    logits = torch.randn(6, 3 * CDF_BLOCK + 100, generator=torch.Generator().manual_seed(2)) * 3
    temperatures = [0.3, 0.0, 1.0, 0.3, 2.0, 0.0]

    def generators(seed: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed * 10 + i) for i in range(6)]

    for seed in range(25):
        batch = sample_rows(logits, temperatures, generators(seed))
        alone = [
            sample_token(logits[i], temperatures[i], g) for i, g in enumerate(generators(seed))
        ]
        assert batch == alone
        assert batch[1] == int(logits[1].argmax()) and batch[5] == int(logits[5].argmax())


def test_weights_under_float32s_normal_range_are_zero():
    # Below 2**-125.5 of the top weight (a natural-log gap of 86.99) they would be denormals or
    # nearly so (or 0 below -103.97): a slow path on some CPUs. (The scaled argument near -125
    # carries an ulp of ~8e-6, ~5e-6 relative after exp2.)
    logits = torch.tensor([[0.0, -1.0, -86.0, -86.9, -87.1, -90.0, -100.0, -200.0, float("-inf")]])
    weights = softmax_weights(logits, torch.tensor([[LOG2E]]))
    assert torch.allclose(weights[0, :4], torch.exp(logits[0, :4]), rtol=2e-5, atol=0)
    assert torch.exp(logits[0, 4:7]).gt(0).all() and weights[0, 4:].eq(0).all()
    # The same through the temperature: -30 at T 0.3 is -100 after scaling.
    hot = softmax_weights(torch.tensor([[0.0, -30.0]]), torch.tensor([[LOG2E / 0.3]]))
    assert hot[0, 0] == 1 and hot[0, 1] == 0


def test_tokens_of_negligible_weight_are_never_drawn():
    n = 2 * CDF_BLOCK + 10
    logits = torch.full((n,), -95.0)
    logits[::7] = float("-inf")
    hot = [3, CDF_BLOCK + 1]
    logits[hot] = torch.tensor([0.0, -1.0])
    for temperature in (1.0, 0.3):
        g = torch.Generator().manual_seed(3)
        draws = {sample_token(logits, temperature, g) for _ in range(400)}
        assert draws == set(hot)


def test_a_row_without_finite_logits_draws_no_token():
    """NaN anywhere, +inf, or -inf everywhere give no distribution: such a row draws NO_TOKEN
    (greedy or sampled) and the other rows draw as they would alone."""
    logits = torch.randn(8, 3 * CDF_BLOCK + 5)
    logits[1, 7] = float("nan")
    logits[2, 9] = float("inf")
    logits[3] = float("-inf")
    logits[5, 2] = float("nan")
    logits[6, 4] = float("inf")
    temperatures = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.7]
    gens = [torch.Generator().manual_seed(i) for i in range(8)]
    tokens = sample_rows(logits, temperatures, gens)
    assert tokens[1:4] == [NO_TOKEN] * 3 and tokens[5:7] == [NO_TOKEN] * 2
    for i in (0, 4, 7):
        alone = sample_token(logits[i], temperatures[i], torch.Generator().manual_seed(i))
        assert tokens[i] == alone != NO_TOKEN
    assert tokens[4] == int(logits[4].argmax())


def test_greedy_takes_the_first_maximum_as_argmax_does():
    n = 2 * CDF_BLOCK + 3
    logits = torch.randn(5, n)
    logits[0, [5, CDF_BLOCK + 9]] = 50.0  # a tie across blocks
    logits[1, [CDF_BLOCK - 1, CDF_BLOCK]] = 50.0  # a tie across a block border
    logits[2, n - 1] = 50.0  # the short last block's last entry
    logits[3, [2 * CDF_BLOCK, n - 2]] = 50.0  # a tie inside the short last block
    logits[4] = 1.0  # every entry the same
    tokens = sample_rows(logits, [0.0] * 5, [None] * 5)
    assert tokens == logits.argmax(1).tolist() == [5, CDF_BLOCK - 1, n - 1, 2 * CDF_BLOCK, 0]


def test_a_tiny_temperature_draws_the_maximum():
    # log2(e) / T overflows float32 below T ~4e-39; the top entry's 0 * inf would be NaN.
    logits = torch.randn(3, CDF_BLOCK + 7)
    for temperature in (1e-3, 4e-39, 1e-300):
        g = torch.Generator().manual_seed(0)
        assert sample_rows(logits, [temperature] * 3, [g] * 3) == logits.argmax(1).tolist()


def test_the_sliver_past_a_blocks_running_sum_never_draws_a_zero_weight(monkeypatch):
    """Where a block's float32 sum exceeds its float64 running sum, a uniform number in between
    lands past the running sum: it takes the block's last token of nonzero weight."""
    torch.manual_seed(1)
    for _ in range(200):
        logits = torch.randn(1, 2 * CDF_BLOCK) * 0.5
        logits[0, CDF_BLOCK - 1] = float("-inf")  # the first block's last token: weight 0
        weights = softmax_weights(logits, torch.tensor([[LOG2E]]))[0].double()
        block32 = weights[:CDF_BLOCK].float().sum().double()
        block64 = weights[:CDF_BLOCK].cumsum(0)[-1]
        if block32 > block64:
            break
    else:
        pytest.fail("no block with a float32 sum above its running sum")
    total = block32 + weights[CDF_BLOCK:].float().sum().double()
    u = float((block32 + block64) / 2 / total)  # inside the sliver
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(u, dtype=torch.float64))
    token = sample_token(logits[0], 1.0, torch.Generator())
    assert token == CDF_BLOCK - 2  # the last token of weight > 0 in that block
