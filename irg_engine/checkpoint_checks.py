"""What a checkpoint's contents must satisfy before (and after) they become a model, each check
raising one `CheckpointError` that names the file and the tensors or keys at fault.

`checkpoint.load` runs them in order: the layer count against the tensors (before any module is
built), names and shapes, dtypes (floating point only: integer weights would be cast silently),
and, once loaded, finiteness (NaN or Inf weights would serve empty texts and black images).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

SHOW = 5  # tensors named in a message; the rest are counted
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names
LLM_LAYER = re.compile(r"language_model\.model\.layers\.(\d+)\.")
VIT_LAYER = re.compile(r"vit_model\.vision_model\.encoder\.layers\.(\d+)\.")


class CheckpointError(Exception):
    """A checkpoint folder that cannot be loaded; the message says exactly why."""


def _listed(items: list[str]) -> str:
    more = f" ... and {len(items) - SHOW} more" if len(items) > SHOW else ""
    return ", ".join(items[:SHOW]) + more


def check_layer_count(root: Path, headers: dict, lm_layers: int, vit_layers: int) -> None:
    """Before any module is built (a config that says a million layers would take minutes).
    The ViT runs one layer fewer than its config lists, and the files may hold that last one."""
    for config, pattern, layers, exact in (
        ("llm_config.json", LLM_LAYER, lm_layers, True),
        ("vit_config.json", VIT_LAYER, vit_layers, False),
    ):
        held = {int(m.group(1)) for k in headers if (m := pattern.match(k))}
        if held and (layers != max(held) + 1 if exact else layers > max(held) + 1):
            raise CheckpointError(
                f"{root}: {config} asks for {layers} layers, the weights hold {max(held) + 1}"
            )


def check_weights(what: str, module: torch.nn.Module) -> None:
    """Every weight finite: NaN or Inf would load and serve empty texts and black images."""
    bad = [n for n, p in module.state_dict().items() if not _finite(p)]
    if bad:
        raise CheckpointError(f"{what}: {len(bad)} tensors hold NaN or Inf: {_listed(bad)}")


def _finite(t: torch.Tensor) -> bool:
    # NaN and +-Inf reach the extremes; `isfinite` would make full-size temporaries (~2x the
    # tensor: 3.8 GB for the 7B model's float32 embedding) and runs ~25x slower.
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_dtypes(what: str, headers: dict[str, tuple[list[int], str]]) -> None:
    bad = [f"{k} ({d})" for k, (_, d) in headers.items() if d not in FLOAT_DTYPES]
    if bad:
        raise CheckpointError(f"{what}: {len(bad)} tensors are not floating point: {_listed(bad)}")


def check_names(what: str, expected: dict[str, torch.Size], found: dict[str, list[int]]) -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [
        f"{k} {list(found[k])} (expected {list(expected[k])})"
        for k in expected
        if k in found and list(found[k]) != list(expected[k])
    ]
    problems = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
    ):
        if items:
            problems.append(f"{len(items)} {label}: {_listed(items)}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))
