"""The server's life: `python -m server` as a process (settings from IRG_* variables, the SIGTERM
drain, a model that cannot load) and the probes while the model is loading.

On SIGTERM the server refuses new work (503, /ready 503), lets a request that can finish within
the shutdown timeout finish, ends one that cannot with an `error` event (`shutdown`), and exits 0.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time

import httpx
import pytest

from server.app import create_app
from server.settings import Settings
from tests.server_fixtures import LiveServer, ServerProcess, SseReader, wait_for

SHORT = {"prompt": "short", "recipe": "t2i", "width": 32, "height": 32, "num_timesteps": 20}
# Well past the 2 s shutdown timeout on two CPU cores (256 px took 1.2 s on a fast AMD VM).
LONG = {**SHORT, "prompt": "long", "width": 512, "height": 512, "num_timesteps": 200}


@pytest.mark.slow
def test_sigterm_drains_then_exits_zero(tiny_dir):
    proc = ServerProcess(
        {
            "IRG_MODEL": str(tiny_dir),
            "IRG_SHUTDOWN_TIMEOUT": "2",
            "IRG_KEEPALIVE_INTERVAL": "0.2",
            "IRG_MAX_RUNNING": "2",
            "IRG_LOG_LEVEL": "info",
        }
    )
    try:
        proc.wait_ready()
        started = threading.Barrier(3, timeout=30)
        streams: dict[str, object] = {}

        def run(name: str, body: dict) -> None:
            with (
                httpx.Client(base_url=proc.url, timeout=60) as client,
                client.stream("POST", "/generate", json={**body, "stream": True}) as r,
            ):
                assert r.status_code == 200
                reader = SseReader(r)
                reader.read(until="image.progress")
                started.wait()
                streams[name] = reader.read()

        threads = [
            threading.Thread(target=run, args=("short", SHORT)),
            threading.Thread(target=run, args=("long", LONG)),
        ]
        for t in threads:
            t.start()
        started.wait()  # both are running
        proc.proc.send_signal(signal.SIGTERM)

        with httpx.Client(base_url=proc.url, timeout=10) as client:
            # Draining: still listening, but refusing.
            ready = client.get("/ready")
            assert ready.status_code == 503 and ready.json()["reason"] == "draining"
            refused = client.post("/generate", json=SHORT)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            assert refused.headers["Retry-After"]

        for t in threads:
            t.join(timeout=30)
        assert proc.proc.wait(timeout=30) == 0
        short, long = streams["short"], streams["long"]
        assert short.names[-1] == "done"
        assert long.names[-1] == "error" and long.of("error")[0]["code"] == "shutdown"
    finally:
        log = proc.stop()
    assert "draining" in log


def test_bad_model_path_exits_1(tmp_path):
    proc = ServerProcess({"IRG_MODEL": str(tmp_path / "missing")})
    try:
        assert proc.proc.wait(timeout=60) == 1
    finally:
        log = proc.stop()
    assert "cannot start" in log


def test_a_port_in_use_exits_with_uvicorns_code_not_an_abort(tiny_dir):
    """uvicorn leaves with sys.exit when it cannot bind; the model load's thread was then ended
    inside torch at interpreter exit (SIGABRT, "terminate called")."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {"IRG_MODEL": str(tiny_dir), "IRG_PORT": str(taken.getsockname()[1])}
        proc = ServerProcess(env)
        try:
            code = proc.proc.wait(timeout=60)
        finally:
            log = proc.stop()
    assert code not in (0, -signal.SIGABRT) and "terminate called" not in log, (code, log)
    assert "address already in use" in log.lower()


def test_sigterm_while_the_model_loads_exits_at_once(tiny_dir, tmp_path):
    """A load that cannot finish (here a config file that is a pipe nobody writes) does not
    keep a server asked to stop alive."""
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    (model / "llm_config.json").unlink()
    os.mkfifo(model / "llm_config.json")
    proc = ServerProcess({"IRG_MODEL": str(model)})
    try:
        assert wait_for(lambda: _answers(proc.url + "/health"), timeout=60)
        assert httpx.get(proc.url + "/ready", timeout=5).json()["reason"] == "loading model"
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(timeout=15) == 0
    finally:
        proc.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_probes_answer_while_the_model_loads(tiny_dir):
    app = create_app(Settings(model=tiny_dir, shutdown_timeout=0.5))
    server = LiveServer(app).start()  # the socket opens before the weights are in
    try:
        with server.client() as http:
            assert http.get("/health").status_code == 200
            ready = http.get("/ready")
            if ready.status_code == 503:  # (a very fast load may already be done)
                assert ready.json()["reason"] == "loading model"
                r = http.post("/generate", json=SHORT)
                assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
            assert wait_for(lambda: http.get("/ready").status_code == 200, timeout=60)
            assert http.post("/generate", json={**SHORT, "num_timesteps": 3}).status_code == 200
    finally:
        server.stop()


@pytest.mark.slow
def test_a_second_signal_while_requests_run_exits_at_once_without_aborting(tiny_dir):
    """The second signal skips the app's shutdown, so the engine's threads can still be in torch
    (here the VAE decode of a 1024 px image): at interpreter exit the process aborted there
    (SIGABRT). It exits at once instead, and quietly: uvicorn's forced exit logged a traceback
    at ERROR for every task it cancelled."""
    proc = ServerProcess(
        {"IRG_MODEL": str(tiny_dir), "IRG_SHUTDOWN_TIMEOUT": "30", "IRG_LOG_LEVEL": "info"}
    )
    body = {**SHORT, "width": 1024, "height": 1024, "num_timesteps": 2, "stream": True}
    try:
        proc.wait_ready()
        with (
            httpx.Client(base_url=proc.url, timeout=60) as client,
            client.stream("POST", "/generate", json=body) as r,
        ):
            reader = SseReader(r)
            while True:  # up to the last denoising step: the VAE decode (seconds on a CPU) is next
                seen = reader.read(until="image.progress")
                assert seen.names[-1] == "image.progress", seen.names
                if seen.events[-1][2]["step"] == seen.events[-1][2]["total_steps"]:
                    break
            proc.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            proc.proc.send_signal(signal.SIGTERM)
            assert proc.proc.wait(timeout=30) == 0
    finally:
        log = proc.stop()
    assert "received SIGTERM again: exiting now" in log
    assert "terminate called" not in log and "Traceback" not in log and "ERROR" not in log
