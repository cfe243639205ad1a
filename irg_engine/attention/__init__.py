"""Attention for packed variable-length segments that sit after a cached prefix.

Every attention call in the model is one of two shapes: a causal text segment appended after a
context (query i sees the whole context and its own segment up to i: bottom-right alignment) or a
bidirectional image block after a context. The model never sees caches: each layer hands its
projected q/k/v to an `AttentionPlan`, which knows which rows form which segment, where each
segment's context keys live and whether the segment's own keys are written back. The reference
recipes use a dense plan (`irg_engine.recipes.context`); the engine uses a paged one.

Backends compute one segment at a time given contiguous keys; `sdpa` (torch
scaled_dot_product_attention with an explicit mask) is the reference and works everywhere;
`xformers` is optional (CUDA, when its build matches torch). `auto` picks `sdpa`: measured on an
H200, dense per-segment SDPA already reaches the matmul ceiling on denoise rows (DESIGN.md 7).
"""

from __future__ import annotations

from typing import Protocol

import torch

from irg_engine.attention import xformers_backend
from irg_engine.attention.sdpa import sdpa_segment

BACKENDS = {"sdpa": sdpa_segment, "xformers": xformers_backend.xformers_segment}


def available_backends() -> list[str]:
    return ["sdpa"] + (["xformers"] if xformers_backend.available() else [])


def resolve_backend(name: str) -> str:
    """The backend a setting names; `auto` is `sdpa`. Unknown or unavailable names are errors."""
    if name == "auto":
        return "sdpa"
    if name not in BACKENDS:
        raise ValueError(
            f"attention backend must be one of auto, {', '.join(BACKENDS)}; got {name!r}"
        )
    if name not in available_backends():
        raise ValueError(
            f"attention backend {name!r} is not available here "
            f"(available: {', '.join(available_backends())})"
        )
    return name


class AttentionPlan(Protocol):
    """What a decoder layer calls: rows of q/k/v in, attention output rows out."""

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor: ...


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, backend: str = "sdpa"
) -> torch.Tensor:
    """Attention of q `[Lq, Hq, d]` over k/v `[Lk, Hkv, d]`, Lk >= Lq.

    The last Lq keys are the query segment's own; with `causal` query i sees keys
    `< Lk - Lq + i + 1`, otherwise all keys.
    """
    return BACKENDS[backend](q, k, v, causal)
