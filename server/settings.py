"""Server settings: one dataclass, filled from command-line flags, `IRG_*` variables or defaults.

Every field is a flag (`max_running` -> `--max-running`) and an environment variable
(`IRG_MAX_RUNNING`), so a container is configured with `-e` alone. Precedence: flag, then
variable, then the default here. `parse_settings` is the only reader of the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from irg_engine.attention import BACKENDS
from server.protocol import (
    MAX_PARTIAL_IMAGES,
    MAX_REFINE_ROUNDS,
    MAX_SIDE,
    MAX_TIMESTEPS,
    MIN_SIDE,
    MIN_TIMESTEPS,
)

DTYPES = ("auto", "bfloat16", "float16", "float32")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
MiB = 1024 * 1024


def _opt(help: str, **kw) -> dict:
    return {"help": help, **kw}


@dataclass(slots=True, frozen=True)
class Settings:
    model: Path | None = field(
        default=None,
        metadata=_opt("BAGEL-layout checkpoint folder (default: the embedded tiny random model)"),
    )
    host: str = field(default="127.0.0.1", metadata=_opt("address to bind"))
    port: int = field(default=8000, metadata=_opt("port to bind"))
    device: str = field(default="auto", metadata=_opt("torch device: auto, cpu, cuda, cuda:N"))
    dtype: str = field(default="auto", metadata=_opt("weight dtype", choices=DTYPES))
    attention_backend: str = field(
        default="auto", metadata=_opt("attention backend of the engine (auto: its default)")
    )
    decode_graphs: str = field(
        default="auto",
        metadata=_opt(
            "decode-only steps as CUDA graphs (auto: on CUDA; off: never)", choices=("auto", "off")
        ),
    )
    decode_ahead: str = field(
        default="on",
        metadata=_opt(
            "with decode graphs, launch each request's next decode step before its program "
            "sees this step's token (on: the GPU computes while the host streams; off)",
            choices=("on", "off"),
        ),
    )
    cpu_threads: int = field(
        default=0,
        metadata=_opt(
            "CPU threads for torch ops, shared by the engine loop and its image worker "
            "(0: torch's default, all cores)"
        ),
    )
    max_running: int = field(default=8, metadata=_opt("requests the engine runs at once"))
    max_queued: int = field(
        default=64, metadata=_opt("requests waiting beyond those running; more get 429")
    )
    request_timeout: float = field(
        default=1800.0, metadata=_opt("seconds from arrival until a request times out")
    )
    shutdown_timeout: float = field(
        default=30.0,
        metadata=_opt("seconds in-flight requests may finish after SIGTERM before being aborted"),
    )
    api_key: str | None = field(
        default=None,
        metadata=_opt(
            "require `Authorization: Bearer KEY` (not on /health, /ready or the page at /)"
        ),
    )
    max_body_bytes: int = field(default=32 * MiB, metadata=_opt("largest request body"))
    body_timeout: float = field(
        default=30.0,
        metadata=_opt("seconds a request body may go without data before a 408 answer"),
    )
    header_timeout: float = field(
        default=30.0,
        metadata=_opt(
            "seconds a connection has to send a request's line and headers (from connecting, "
            "or from a kept-alive connection's next byte) before a 408 closes it"
        ),
    )
    max_image_bytes: int = field(default=16 * MiB, metadata=_opt("largest decoded input image"))
    max_image_pixels: int = field(
        default=4096 * 4096, metadata=_opt("largest input image, width x height")
    )
    max_prompt_tokens: int = field(default=4096, metadata=_opt("longest prompt, in tokens"))
    max_think_tokens: int = field(
        default=4096, metadata=_opt("largest max_think_tokens a request may ask for")
    )
    # Caps on the cost of one request. A request over one gets a 400; one that leaves the
    # parameter unset gets the smaller of its default and the cap.
    max_image_side: int = field(
        default=MAX_SIDE,
        metadata=_opt(
            f"largest width or height a request may ask for, a multiple of 16 in "
            f"{MIN_SIDE}..{MAX_SIDE} (an edit draws at its input's size after the model's "
            f"resize, whose longest side is at least 512)"
        ),
    )
    max_timesteps: int = field(
        default=MAX_TIMESTEPS,
        metadata=_opt(
            f"largest num_timesteps a request may ask for ({MIN_TIMESTEPS}..{MAX_TIMESTEPS})"
        ),
    )
    max_refine_rounds: int = field(
        default=MAX_REFINE_ROUNDS,
        metadata=_opt(f"largest refine_rounds a request may ask for (0..{MAX_REFINE_ROUNDS})"),
    )
    max_partial_images: int = field(
        default=MAX_PARTIAL_IMAGES,
        metadata=_opt(f"largest partial_images a request may ask for (0..{MAX_PARTIAL_IMAGES})"),
    )
    keepalive_interval: float = field(
        default=15.0, metadata=_opt("seconds of silence before an SSE keep-alive comment")
    )
    log_level: str = field(default="info", metadata=_opt("log level", choices=LOG_LEVELS))

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        positive = (
            "max_running",
            "request_timeout",
            "max_body_bytes",
            "body_timeout",
            "header_timeout",
            "max_image_bytes",
            "max_image_pixels",
            "max_prompt_tokens",
            "max_think_tokens",
            "keepalive_interval",
        )
        # (`not x > 0`: NaN, which argparse's float() takes, compares false either way)
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_queued", "shutdown_timeout", "cpu_threads"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        # The request models hold the model's limits; a server can only cap lower.
        ranges = {
            "max_image_side": (MIN_SIDE, MAX_SIDE),
            "max_timesteps": (MIN_TIMESTEPS, MAX_TIMESTEPS),
            "max_refine_rounds": (0, MAX_REFINE_ROUNDS),
            "max_partial_images": (0, MAX_PARTIAL_IMAGES),
        }
        for name, (low, high) in ranges.items():
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name} must be in {low}..{high}, got {getattr(self, name)}")
        if self.max_image_side % 16:
            raise ValueError(f"max_image_side must be a multiple of 16, got {self.max_image_side}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        backends = ("auto", *BACKENDS)
        if self.attention_backend not in backends:
            raise ValueError(
                f"attention_backend must be one of {backends}, got {self.attention_backend!r}"
            )
        if self.decode_graphs not in ("auto", "off"):
            raise ValueError(f"decode_graphs must be auto or off, got {self.decode_graphs!r}")
        if self.decode_ahead not in ("on", "off"):
            raise ValueError(f"decode_ahead must be on or off, got {self.decode_ahead!r}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.api_key == "":
            # An empty IRG_API_KEY means "no key", not "the empty key".
            object.__setattr__(self, "api_key", None)

    @property
    def max_in_flight(self) -> int:
        return self.max_running + self.max_queued

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)


def env_name(field_name: str) -> str:
    return "IRG_" + field_name.upper()


def _converter(f: dataclasses.Field):
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if "Path" in kind:
        return Path
    if kind.startswith("int"):
        return int
    if kind.startswith("float"):
        return float
    return str


def build_parser(prog: str = "irg-server") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="IRG inference server. Every flag can also be set as IRG_<FLAG> "
        "(e.g. --max-running -> IRG_MAX_RUNNING).",
    )
    for f in dataclasses.fields(Settings):
        meta = dict(f.metadata)
        shown = "" if f.default in (None, dataclasses.MISSING, "") else f"; default {f.default}"
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_converter(f),
            default=None,  # None = not given; the environment or the dataclass default applies
            help=f"{meta.pop('help')} [env {env_name(f.name)}{shown}]",
            **meta,
        )
    return parser


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from flags over `IRG_*` variables over defaults; exits (argparse) on bad input."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    values = {}
    for f in dataclasses.fields(Settings):
        given = getattr(args, f.name)
        if given is None and env_name(f.name) in environ:
            raw = environ[env_name(f.name)]
            try:
                given = _converter(f)(raw)
            except ValueError:
                parser.error(f"{env_name(f.name)}={raw!r} is not a valid {f.name}")
            choices = f.metadata.get("choices")
            if choices and given not in choices:
                parser.error(f"{env_name(f.name)}={raw!r}: choose from {', '.join(choices)}")
        if given is not None:
            values[f.name] = given
    try:
        return Settings(**values)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
