"""The `irg` client CLI and bench/serve_bench.py against a live server on the tiny model."""

from __future__ import annotations

import importlib.util
import io
import json
import sys

import pytest
from PIL import Image

from server import cli
from tests.server_fixtures import ROOT, live_server

SMALL_ARGS = ["--width", "32", "--height", "32", "--num-timesteps", "3", "--max-think-tokens", "4"]


@pytest.fixture(scope="module")
def server(tiny_model):
    with live_server(tiny_model, max_running=4) as s:
        yield s


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_generate_streams_thoughts_bars_and_saves_files(server, tmp_path):
    code, out, err = run_cli(
        "--server", server.url, "generate", "a small house", "--out", str(tmp_path), *SMALL_ARGS
    )
    assert code == 0, err
    assert "[think 1]" in out and "[reflect 2]" in out
    assert "image 1 [" in err and "2/2" in err and "done in" in err
    for r in (1, 2):
        assert Image.open(tmp_path / f"round{r}.png").size == (32, 32)
    texts = json.loads((tmp_path / "texts.json").read_text())
    assert [t["stage"] for t in texts] == ["think", "reflect"]
    assert "# a small house" in (tmp_path / "texts.md").read_text()
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "ok" and "random" in result["model"]


def test_generate_reports_http_errors(server, tmp_path):
    (tmp_path / "round1.png").write_bytes(b"an earlier run's")
    code, _, err = run_cli(
        "--server", server.url, "generate", "x", "--out", str(tmp_path), "--width", "100"
    )
    assert code == 1 and "error 400" in err and "width" in err
    assert not (tmp_path / "round1.png").exists()
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "failed" and result["error"]["status"] == 400
    assert result["error"]["code"] == "invalid_parameter"


def test_a_prompt_that_is_not_utf8_is_refused_in_words(tmp_path):
    # What Python makes of the shell's bytes b"caf\xe9" (Latin-1): a lone surrogate.
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")
    code, _, err = run_cli(
        "--server", "http://127.0.0.1:9", "generate", prompt, "--out", str(tmp_path)
    )
    assert code == 1 and "not valid UTF-8" in err


def test_the_read_timeout_goes_before_the_subcommand(tmp_path):
    # After `generate` it was taken for an abbreviation of --timeout-s (the server's deadline).
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate", "x", "--out", str(tmp_path), "--timeout", "5"])
    args = cli.build_parser().parse_args(["--timeout", "5", "generate", "x", "--out", "o"])
    assert (args.timeout, args.timeout_s) == (5.0, None)


def test_a_failed_run_says_so_and_leaves_no_earlier_outputs(server, tmp_path):
    code, _, err = run_cli(
        "--server", server.url, "generate", "first", "--out", str(tmp_path), *SMALL_ARGS
    )
    assert code == 0, err
    # A deadline that passes mid-think: an `error` event once the stream has started.
    code, _, err = run_cli(
        "--server", server.url, "generate", "second", "--out", str(tmp_path),
        "--width", "32", "--height", "32", "--max-think-tokens", "2000", "--timeout-s", "1",
    )  # fmt: skip
    assert code == 1 and "error: timeout" in err, err
    assert not list(tmp_path.glob("round*.png")) and not (tmp_path / "texts.md").exists()
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "failed" and result["error"]["code"] == "timeout"
    assert result["texts"][0]["stage"] == "think" and result["texts"][0]["text"]


def test_health(server):
    code, out, _ = run_cli("--server", server.url, "health")
    assert code == 0 and "ready: 200" in out
    code, _, err = run_cli("--server", "http://127.0.0.1:9", "health")
    assert code == 2 and "cannot reach" in err


def load_bench():
    spec = importlib.util.spec_from_file_location("serve_bench", ROOT / "bench" / "serve_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("load", [["--concurrency", "2"], ["--rate", "20"]])
def test_serve_bench_reports_json_and_table(server, tmp_path, capsys, load):
    bench = load_bench()
    report_path = tmp_path / "report.json"
    argv = [
        "--server",
        server.url,
        "--num-prompts",
        "3",
        *load,
        "--recipe",
        "think_t2i",
        *SMALL_ARGS,
        "--json",
        str(report_path),
    ]
    assert bench.main(argv) == 0
    report = json.loads(report_path.read_text())
    assert report["completed"] == 3 and report["failed"] == 0
    assert report["requests_per_s"] > 0 and report["images_per_s"] > 0
    for key in ("latency_s", "time_to_first_think_token_s", "time_to_first_image_s"):
        assert set(report[key]) == {"mean", "p50", "p90", "p99"}
    table = capsys.readouterr().out
    assert "throughput" in table and "first image" in table
