"""The units of model work a recipe program asks for, and the context operations it may use.

Recipes are written as generator programs: plain sequential code that `yield`s a work item each
time it needs the model and receives the item's result back. Two executors run them:
- `recipes/dense.py` runs each item at once on dense per-context caches (the reference);
- the engine collects the pending items of many requests, batches them into shared forward
  passes over a paged KV cache, and sends each program its own result.
Contexts are opaque handles owned by the executor (`Contexts`); programs create, fork and free
them but never look inside. Sizes (`tokens`) are what the engine's scheduler budgets with, and
the model work items carry the `kind` it plans by (decode, denoise, prefill, block).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from PIL import Image

from irg_engine.sampler import NO_TOKEN


@dataclass(slots=True)
class PrefillText:
    """Append a text segment (causal). `shared` marks a prefix worth caching across requests."""

    kind: ClassVar[str] = "prefill"

    ctx: Any
    ids: list[int]
    shared: bool = False

    @property
    def tokens(self) -> int:
        return len(self.ids)


@dataclass(slots=True)
class PrefillLatent:
    """Append a clean latent `[1, C, 2h, 2w]` as a VAE block (t = 0, bidirectional)."""

    kind: ClassVar[str] = "block"

    ctx: Any
    latent: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.latent.shape[-2] * self.latent.shape[-1] // 4 + 2


@dataclass(slots=True)
class PrefillVit:
    """Append an image as a ViT block; `patches`/`ids` come from `context.vit_inputs`."""

    kind: ClassVar[str] = "block"

    ctx: Any
    patches: torch.Tensor
    ids: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.patches.shape[0] + 2


@dataclass(slots=True)
class DecodeStep:
    """Feed one token at the context's next position; the result is a `Decoded`: the logits
    and the next token, drawn by the executor (`sampler.py`) at this temperature with this
    generator (greedy at 0), so that an executor can sample all of a step's rows at once.

    `stop_token` and `last` state the program's stopping rule (it feeds the drawn token next
    unless it is `stop_token` or this step is the `last`), so that an executor can start the
    next step before the program has seen this one's result (`Runner`'s decode-ahead)."""

    kind: ClassVar[str] = "decode"

    ctx: Any
    token: int
    temperature: float = 0.0
    generator: torch.Generator | None = None
    stop_token: int | None = None
    last: bool = False

    def continues(self, drawn: int) -> bool:
        """Whether the program will feed `drawn` as its next DecodeStep."""
        return not self.last and drawn != self.stop_token and drawn != NO_TOKEN

    @property
    def tokens(self) -> int:
        return 1


class NonFiniteLogits(ValueError):
    """A decode step's logits were NaN or infinite: the request cannot go on."""


@dataclass(slots=True)
class Decoded:
    """The result of a `DecodeStep`: the next token and the logits it was drawn from."""

    token: int  # NO_TOKEN where the logits were not finite
    logits: torch.Tensor  # [vocab], float32, on the device that computed it

    def checked(self) -> int:
        """The token; `NonFiniteLogits` where there is none."""
        if self.token == NO_TOKEN:
            raise NonFiniteLogits(
                "the model's logits were not finite (NaN or infinite) at a decode step"
            )
        return self.token


@dataclass(slots=True)
class Velocity:
    """One denoising evaluation: the same noisy tokens queried against each context (one row
    per guidance branch, never written). The result is one velocity per context, float32, on
    the executor's device."""

    kind: ClassVar[str] = "denoise"

    contexts: list[Any]
    x: torch.Tensor
    t: float
    grid: tuple[int, int]

    @property
    def tokens(self) -> int:
        return len(self.contexts) * (self.x.shape[0] + 2)


@dataclass(slots=True)
class EncodeLatent:
    """VAE-encode an image (resized by the VAE rule); the result is its posterior-mean latent."""

    image: Image.Image
    tokens: int = 0


@dataclass(slots=True)
class DecodeLatents:
    """VAE-decode latent tokens; the result is the float image `[1, 3, H, W]` in [-1, 1]."""

    x: torch.Tensor
    grid: tuple[int, int]
    tokens: int = 0


@dataclass(slots=True)
class ReadKV:
    """Inspection: the context's cached keys and values, per layer `[tokens, kv_heads, dim]`."""

    ctx: Any
    tokens: int = 0


Work = (
    PrefillText
    | PrefillLatent
    | PrefillVit
    | DecodeStep
    | Velocity
    | EncodeLatent
    | DecodeLatents
    | ReadKV
)
LM_WORK = (PrefillText, PrefillLatent, PrefillVit, DecodeStep, Velocity)
Program = Generator[Work, Any, Any]


class Contexts(Protocol):
    """Context handles of one request, owned by the executor."""

    def new(self, name: str) -> Any: ...

    def fork(self, ctx: Any, name: str) -> Any:
        """A context that shares everything `ctx` holds now and then grows on its own."""

    def free(self, ctx: Any) -> None: ...

    def rope(self, ctx: Any) -> int:
        """The position the next token appended to `ctx` will take."""


@dataclass(slots=True)
class Env:
    """What a program needs besides its parameters: vocabulary, model shape, contexts, observer."""

    tokenizer: Any
    cfg: Any
    contexts: Contexts
    observer: Any
