"""The GPU benchmark's count of an IRG request's denoising passes, against DESIGN.md 7.

`bench/gpu_bench.py` divides its IRG timings by these counts (the floor of a request alone and
the denoise-bound ceiling of many), and it only runs on a device, so the count is checked here.
"""

import sys
from pathlib import Path

import pytest

from irg_engine.recipes import RecipeParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from gpu_probes import irg_passes


def test_paper_settings_match_the_design_count() -> None:
    # DESIGN.md 7: ~237 passes, 90 for image 1 (cfg_text inside [0.4, 1] only) and 147 for
    # image 2 (three branches at each of its 49 steps, two of them over image 1's blocks).
    assert irg_passes(RecipeParams("p")) == {"short_context": 90 + 49, "long_context": 98}


@pytest.mark.parametrize(
    ("settings", "short", "long"),
    [
        (dict(num_timesteps=12), 20 + 11, 22),  # the concurrent run's default
        (dict(num_timesteps=12, cfg_text_scale=1.0), 11 + 11, 11),  # no text guidance
        (dict(num_timesteps=12, cfg_img_scale=1.0), 20, 22),  # image 2 without image-free
    ],
)
def test_guidance_settings_change_the_count(settings: dict, short: int, long: int) -> None:
    assert irg_passes(RecipeParams("p", **settings)) == {
        "short_context": short,
        "long_context": long,
    }
