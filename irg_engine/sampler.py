"""The next token of each decode row: greedy at temperature 0, else one draw from
softmax(logits / temperature) with the row's own generator.

A draw inverts the CDF with one uniform number, in two levels so that only one block of the
152k-entry vocabulary is ever summed entry by entry: sums of 1024-entry blocks (float32 within a
block, a float64 running sum across blocks) find the block, a float64 running sum inside it finds
the token. The softmax normaliser is folded into the uniform number instead of dividing every
entry. The weights are powers of two, `exp2((logit - max) * log2(e) / T)`: torch's exp is the
slow one of the two on the CPU (on a 2-core AMD EPYC VM, 1.2M entries: 0.70 ms against 0.19 ms for
exp2), and the GPU computes exp through exp2 anyway. A token whose weight would be at most
2**-125.5 (~1.7e-38) of the top token's gets weight 0, i.e. is never drawn (exactly, all of them
together would be drawn with a probability under 1e-32): results below float32's normal range
(~1.2e-38) take a slow path on some CPUs (exp on that VM: 17 ms instead of 0.5 ms per 1.2M
entries), and at temperature 0.3 most of a 152k vocabulary lies there. Their arguments become
-inf, whose exp2 is 0 on the fast path.

A row whose logits give no distribution (NaN anywhere, +inf, or -inf everywhere: a broken model
or an overflow) draws `NO_TOKEN`, which `Decoded.checked` turns into `NonFiniteLogits` for that
request alone; otherwise the CDF inversion would hand it the vocabulary's last token.

`sample_rows` draws all of a step's rows in one pass of tensor ops on the device that holds the
logits: only the uniform numbers (from each request's host generator) go up and only the tokens
come back, so a GPU step copies no logits to the host. None of a row's numbers depends on the
other rows, so a row draws the same token alone as in any batch. `sample_token` is the one-row
case the reference recipes use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from irg_engine.host_memory import upload

CDF_BLOCK = 1024
NO_TOKEN = -1  # drawn where the logits are not finite; never fed to the model
SCALE_MAX = float(torch.finfo(torch.float32).max)
LOG2E = 1.4426950408889634
EXP2_FLOOR = -125.5  # 2**-125.5 ~ 1.66e-38 is a normal float32; 2**-126.5 is not


def sample_rows(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """One token per row of float32 `logits [rows, vocab]` (a generator may be None where
    T <= 0)."""
    return draw_rows(logits, temperatures, generators).tolist()


def draw_rows(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """`sample_rows` without waiting: the tokens `[rows]` on the logits' device."""
    dev = logits.device
    hot = [i for i, t in enumerate(temperatures) if t > 0]
    cold = [i for i, t in enumerate(temperatures) if t <= 0]
    tokens = torch.zeros(len(temperatures), dtype=torch.long, device=dev)
    if cold:
        picked = _pick(cold, len(temperatures), dev)
        top, best = _first_max(logits[picked])
        tokens[picked] = best.masked_fill_(~top.isfinite(), NO_TOKEN)
    if not hot:
        return tokens
    picked = _pick(hot, len(temperatures), dev)
    x = logits[picked]
    # Capped where log2(e) / T overflows float32 (T < ~4e-39): inf would make the top entry's
    # 0 * inf a NaN; at the cap every entry but the maxima weighs 0, as greedy.
    scale = upload(torch.tensor([[min(LOG2E / temperatures[i], SCALE_MAX)] for i in hot]), dev)
    # Drawn before the weights exist: a draw's uniform number never depends on the logits.
    uniform = upload(
        torch.tensor(
            [[float(torch.rand((), generator=generators[i], dtype=torch.float64))] for i in hot],
            dtype=torch.float64,
        ),
        dev,
    )
    weights = softmax_weights(x, scale)
    n = weights.shape[1]
    cdf = _per_block(weights, torch.sum).double().cumsum(1)
    u = uniform * cdf[:, -1:]
    block = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)
    before = cdf.gather(1, (block - 1).clamp_(min=0)).masked_fill_(block == 0, 0.0)
    start = block * CDF_BLOCK
    # (the clamp to `last` below keeps a draw off the short last block's repeats)
    inner = weights.gather(1, _block_span(start, n)).double().cumsum(1)
    last = (n - start).clamp_(max=CDF_BLOCK) - 1
    # The block's float32 sum and its float64 running sum can differ in the last bits: a draw in
    # that sliver takes the block's last token of nonzero weight (where the running sum reaches
    # its total) rather than spilling into the next block or onto a token of weight 0.
    heaviest_last = torch.searchsorted(inner, inner[:, -1:].contiguous())
    offset = torch.minimum(torch.searchsorted(inner, u - before, right=True), heaviest_last)
    offset = torch.minimum(offset, last)
    # A finite row's top weight is exp2(0) = 1; a NaN anywhere makes the total NaN.
    tokens[picked] = (start + offset).squeeze(1).masked_fill_(~(cdf[:, -1] >= 1), NO_TOKEN)
    return tokens


def softmax_weights(logits: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Unnormalised `exp2((logits - max) * scale)` per row (`scale` is log2(e) / temperature),
    0 where the argument is at most `EXP2_FLOOR` (see the module docstring)."""
    weights = (logits - logits.amax(1, keepdim=True)).mul_(scale)
    return F.threshold_(weights, EXP2_FLOOR, float("-inf")).exp2_()


def _first_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's maximum and the index of its first occurrence (argmax's index).

    On the CPU in two levels, as the draw: torch's argmax there takes ~0.13 ms per 152k-entry
    row (8 rows: 1.05 ms on the AMD VM) while amax streams; block maxima find the first block
    holding the row's maximum, and argmax within that block its first occurrence (8 rows:
    0.17 ms). A row with a NaN has no token either way, so its index does not matter."""
    if x.device.type != "cpu":
        return x.amax(1), x.argmax(1)
    top, block = _per_block(x, torch.amax).max(1)
    start = block * CDF_BLOCK
    # (the short last block's repeats come after its last entry's own place)
    return top, start + x.gather(1, _block_span(start[:, None], x.shape[1])).argmax(1)


def _per_block(x: torch.Tensor, reduce) -> torch.Tensor:
    """`reduce(block, dim, keepdim)` of every `CDF_BLOCK`-entry block of each row of `x`, in
    order (the last block may be short): `[rows, blocks]`."""
    rows, n = x.shape
    full = n - n % CDF_BLOCK
    out = reduce(x[:, :full].reshape(rows, -1, CDF_BLOCK), 2, False)
    if full < n:
        out = torch.cat([out, reduce(x[:, full:], 1, True)], 1)
    return out


def _block_span(start: torch.Tensor, n: int) -> torch.Tensor:
    """The `CDF_BLOCK` indices of the block from each row's `start` (`[rows, 1]`); past the end
    of a row of `n`, its last index repeated."""
    return (start + torch.arange(CDF_BLOCK, device=start.device)).clamp_(max=n - 1)


def _pick(rows: list[int], total: int, dev: torch.device) -> slice | torch.Tensor:
    # Uploaded: a step run ahead draws while the GPU may still run the one before.
    return slice(None) if len(rows) == total else upload(torch.tensor(rows), dev)


def sample_token(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    """The token of one row of logits `[vocab]`."""
    return sample_rows(logits[None], [temperature], [generator])[0]
