"""Server settings: every flag has an IRG_* variable; flags win; bad values are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from server.settings import Settings, build_parser, env_name, parse_settings


def test_defaults():
    s = parse_settings([], environ={})
    assert s == Settings()
    assert (s.host, s.port, s.model, s.api_key) == ("127.0.0.1", 8000, None, None)


def test_every_flag_has_an_env_variable():
    env = {
        "IRG_MODEL": "/weights",
        "IRG_HOST": "0.0.0.0",
        "IRG_PORT": "9000",
        "IRG_DEVICE": "cuda:1",
        "IRG_DTYPE": "bfloat16",
        "IRG_ATTENTION_BACKEND": "sdpa",
        "IRG_DECODE_GRAPHS": "off",
        "IRG_DECODE_AHEAD": "off",
        "IRG_CPU_THREADS": "2",
        "IRG_MAX_RUNNING": "3",
        "IRG_MAX_QUEUED": "5",
        "IRG_REQUEST_TIMEOUT": "12.5",
        "IRG_SHUTDOWN_TIMEOUT": "7",
        "IRG_API_KEY": "k",
        "IRG_MAX_BODY_BYTES": "1000",
        "IRG_BODY_TIMEOUT": "4.5",
        "IRG_HEADER_TIMEOUT": "6.5",
        "IRG_MAX_IMAGE_BYTES": "900",
        "IRG_MAX_IMAGE_PIXELS": "800",
        "IRG_MAX_PROMPT_TOKENS": "70",
        "IRG_MAX_THINK_TOKENS": "60",
        "IRG_MAX_IMAGE_SIDE": "512",
        "IRG_MAX_TIMESTEPS": "25",
        "IRG_MAX_REFINE_ROUNDS": "0",
        "IRG_MAX_PARTIAL_IMAGES": "2",
        "IRG_KEEPALIVE_INTERVAL": "2",
        "IRG_LOG_LEVEL": "debug",
    }
    assert set(env) == {env_name(f.name) for f in dataclasses.fields(Settings)}
    s = parse_settings([], environ=env)
    assert s.model == Path("/weights") and s.port == 9000 and s.request_timeout == 12.5
    assert (s.max_running, s.max_queued, s.max_in_flight) == (3, 5, 8)
    assert (s.api_key, s.dtype, s.log_level, s.device) == ("k", "bfloat16", "debug", "cuda:1")
    assert (s.decode_graphs, s.decode_ahead, s.cpu_threads) == ("off", "off", 2)
    assert (s.max_body_bytes, s.body_timeout, s.header_timeout) == (1000, 4.5, 6.5)
    caps = (s.max_image_side, s.max_timesteps, s.max_refine_rounds, s.max_partial_images)
    assert caps == (512, 25, 0, 2)
    help_text = build_parser().format_help()
    assert all(name in help_text for name in env)


def test_flags_win_over_env():
    s = parse_settings(["--port", "1234", "--max-running", "2"], environ={"IRG_PORT": "9"})
    assert (s.port, s.max_running) == (1234, 2)


def test_cost_caps_default_to_the_model_limits():
    s = Settings()
    caps = (s.max_image_side, s.max_timesteps, s.max_refine_rounds, s.max_partial_images)
    assert caps == (1024, 200, 4, 3)
    s = parse_settings(["--max-image-side", "64", "--max-timesteps", "3"], environ={})
    assert (s.max_image_side, s.max_timesteps) == (64, 3)


def test_empty_api_key_means_none():
    assert parse_settings([], environ={"IRG_API_KEY": ""}).api_key is None


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--max-running", "0"], {}),
        (["--dtype", "int8"], {}),
        ([], {"IRG_PORT": "eighty"}),
        ([], {"IRG_DTYPE": "int8"}),
        ([], {"IRG_KEEPALIVE_INTERVAL": "-1"}),
        (["--attention-backend", "magic"], {}),
        (["--max-image-side", "2048"], {}),
        (["--max-image-side", "100"], {}),  # not a multiple of 16
        (["--max-image-side", "0"], {}),
        (["--max-timesteps", "1"], {}),
        (["--max-timesteps", "201"], {}),
        ([], {"IRG_MAX_REFINE_ROUNDS": "5"}),
        ([], {"IRG_MAX_PARTIAL_IMAGES": "-1"}),
        (["--cpu-threads", "-1"], {}),
        (["--header-timeout", "nan"], {}),
        ([], {"IRG_SHUTDOWN_TIMEOUT": "nan"}),
    ],
)
def test_bad_values_exit_with_a_message(argv, env, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_settings(argv, environ=env)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
