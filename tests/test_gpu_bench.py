"""The full-size benchmark (`bench/gpu_bench.py`) off the device: its count of an IRG request's
denoising passes against DESIGN.md 7 (its IRG timings are divided by that count), and a run of
the whole script at the tiny shape on the CPU, so that a device call never finds it broken.
"""

import json
import sys
from pathlib import Path

import pytest

from irg_engine.recipes import RecipeParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_bench
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


def test_the_script_runs_every_phase_at_the_tiny_shape(capsys) -> None:
    args = "--shape tiny --device cpu --size 32 --timesteps 3 --think-tokens 2 --concurrent 2"
    args += " --concurrent-timesteps 2 --concurrent-think-tokens 2 --long-context 700 --json"
    assert gpu_bench.main(args.split()) == 0
    result = json.loads(capsys.readouterr().out)
    assert "errors" not in result
    assert result["denoise_long_context"] == 700 and result["denoise_long_ms"] > 0
    assert result["decode_32_tokens_per_s"] > 0 and result["irg_concurrent"]["requests"] == 2
    assert result["decode_no_ahead_32_tokens_per_s"] > 0
    assert result["paged_attention_32_us_target_264"] > 0
    for name in ("served", "cudnn"):
        assert len(result[f"prefill_16_new_shapes_ms_{name}"]) == 2
    assert result["irg_alone_vs_measured_passes"] > 0
    assert result["irg_concurrent_vs_denoise_ceiling"] > 0
