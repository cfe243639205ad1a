"""The next token of each decode row: greedy at temperature 0, else one draw from
softmax(logits / temperature) with the row's own generator.

A draw inverts the CDF with one uniform number, in two levels so that only one block of the
152k-entry vocabulary is ever summed entry by entry: sums of 1024-entry blocks (float32 within a
block, float64 across blocks, as Python floats) find the block, a float64 running sum inside it
finds the token. The softmax normaliser is folded into the uniform number instead of dividing
every entry.

`sample_rows` takes a step's rows together: the weights `exp((x - max) / T)` and the block sums
of every sampled row come from one pass of elementwise ops and per-block sums over
`[rows, vocab]` (8 rows on the 2-core dev VM: 1.8 ms against 2.2-2.4 row by row), and none of
those numbers depends on the other rows, so a row draws the same token alone as in any batch.
`sample_token` is the one-row case the reference recipes use.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

import torch

CDF_BLOCK = 1024


def sample_rows(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token per row of host float32 `logits [rows, vocab]` (both executors hand them over
    so; a generator may be None where T <= 0)."""
    tokens = [int(logits[i].argmax()) if t <= 0 else -1 for i, t in enumerate(temperatures)]
    hot = [i for i, t in enumerate(temperatures) if t > 0]
    if not hot:
        return tokens
    x = logits if len(hot) == len(tokens) else logits[hot]
    inverse = torch.tensor([[1.0 / temperatures[i]] for i in hot])
    weights = (x - x.amax(1, keepdim=True)).mul_(inverse).exp_()
    n = weights.shape[1]
    full = n - n % CDF_BLOCK
    sums = weights[:, :full].reshape(len(hot), -1, CDF_BLOCK).sum(2).tolist()
    if full < n:
        for row, tail in zip(sums, weights[:, full:].sum(1).tolist(), strict=True):
            row.append(tail)
    for row, i in enumerate(hot):
        tokens[i] = _draw(weights[row], sums[row], generators[i])
    return tokens


def sample_token(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    """The token of one row of logits `[vocab]`."""
    return sample_rows(logits[None], [temperature], [generator])[0]


def _draw(weights: torch.Tensor, block_sums: list[float], generator: torch.Generator) -> int:
    block_cdf = list(itertools.accumulate(block_sums))
    u = float(torch.rand((), generator=generator, dtype=torch.float64)) * block_cdf[-1]
    block = min(bisect.bisect_right(block_cdf, u), len(block_cdf) - 1)
    start = block * CDF_BLOCK
    rest = u - (block_cdf[block - 1] if block else 0.0)
    inner = weights[start : start + CDF_BLOCK].double().cumsum(0)
    # The block's float32 sum and its float64 running sum can differ in the last bits: a draw in
    # that sliver takes the block's last token rather than spilling into the next block.
    return start + min(int(torch.searchsorted(inner, rest, right=True)), len(inner) - 1)
