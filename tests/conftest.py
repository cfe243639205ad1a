"""Shared fixtures: where the golden data lives, and tiny random checkpoints written once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from irg_engine import checkpoint
from irg_engine.tiny import write_tiny

GOLDEN = Path(
    os.environ.get("IRG_GOLDEN", Path(__file__).resolve().parents[2] / "shared" / "golden")
)

# The tiny model is made of small ops: one thread avoids OpenMP hand-offs that dominate them.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def golden() -> Path:
    if not (GOLDEN / "checkpoint" / "ema.safetensors").exists():
        pytest.skip(f"golden data not found at {GOLDEN}")
    return GOLDEN


@pytest.fixture(scope="session")
def golden_model(golden):
    return checkpoint.load(golden / "checkpoint")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random checkpoint with the real Qwen2.5 tokenizer (as the server's default)."""
    return write_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return checkpoint.load(tiny_dir)
