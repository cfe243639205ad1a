"""Helpers for the server tests: a live uvicorn server in a thread, an SSE reader, small request
settings, server caps under which any valid request is cheap (for the schema fuzz run), and a
subprocess runner for `python -m server`.

Every server runs the real engine, listens on 127.0.0.1 on a free port and is talked to with a
real HTTP client.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn

from server.app import create_app
from server.http_protocol import uvicorn_config
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
# Small enough that a whole IRG request takes about a second on two CPU cores.
SMALL = {"width": 32, "height": 32, "num_timesteps": 3, "max_think_tokens": 4}
# Server caps under which every request the schema allows costs about SMALL's (well under a
# second on two CPU cores): a fuzz run may send anything valid. No refine rounds: each re-encodes
# the drawn image at the model's minimum of 512 px a side (about 2 s on CPU). max_image_side 32
# also refuses every edit (an edit draws at 512 px a side or more; 5 to 20 s on CPU).
CHEAP = {
    "max_image_side": 32,
    "max_timesteps": 3,
    "max_think_tokens": 4,
    "max_refine_rounds": 0,
    "max_partial_images": 1,
    "max_prompt_tokens": 50,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app) -> None:
        self.app = app
        self.port = free_port()
        # The server's own protocol and settings, on a free local port.
        settings = dataclasses.replace(app.state.irg.settings, host="127.0.0.1", port=self.port)
        config = uvicorn_config(app, settings, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self):
        return self.app.state.irg

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60), **kw)

    def start(self) -> LiveServer:
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > end or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextlib.contextmanager
def live_server(model, on_fatal=None, **settings) -> Iterator[LiveServer]:
    settings.setdefault("keepalive_interval", 0.2)
    settings.setdefault("shutdown_timeout", 0.5)
    app = create_app(Settings(**settings), model=model, on_fatal=on_fatal)
    server = LiveServer(app).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Sse:
    events: list[tuple[int, str, dict]] = field(default_factory=list)
    comments: int = 0

    @property
    def names(self) -> list[str]:
        return [name for _, name, _ in self.events]

    def of(self, name: str) -> list[dict]:
        return [data for _, n, data in self.events if n == name]


class SseReader:
    """Parses an SSE response as a browser's EventSource would, in as many calls as wanted.

    It holds on to one line iterator: dropping a half-read httpx iterator closes the
    connection, which the server (rightly) takes as the client leaving.
    """

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.iter_lines()
        self.seen = Sse()

    def read(self, until: str | None = None) -> Sse:
        """Events up to and including the next `until` (or to the end); all seen so far."""
        out = self.seen
        fields: dict[str, str] = {}
        for line in self.lines:
            if line == "":
                if "event" in fields or "data" in fields:
                    data = json.loads(fields["data"])
                    out.events.append((int(fields["id"]), fields.get("event", "message"), data))
                    if fields.get("event") == until:
                        return out
                fields = {}
            elif line.startswith(":"):
                out.comments += 1
            else:
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
        return out


def read_sse(response: httpx.Response) -> Sse:
    return SseReader(response).read()


def metric(text: str, name: str) -> float:
    """The value of one sample in a Prometheus exposition (exact name, labels included)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# --- `python -m server` in a subprocess -------------------------------------------------------


class ServerProcess:
    """`python -m server` with its output read as it comes (a pipe nobody reads fills up, and
    the server then blocks in its next log line)."""

    def __init__(self, env: dict[str, str], args: list[str] | None = None) -> None:
        self.port = free_port()
        full_env = {**os.environ, "IRG_PORT": str(self.port), **env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", *(args or [])],
            cwd=ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.append(line)

    def wait_ready(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                self._reader.join(timeout=10)
                raise RuntimeError(f"server exited early:\n{''.join(self._lines)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def stop(self) -> str:
        """Kill the server if it still runs; everything it wrote."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=30)
        return "".join(self._lines)
