"""`irg`: the command-line client of a running server.

- `irg [--server URL] [--api-key KEY] generate "a prompt" --out DIR [options]` streams one
  request: thoughts are printed to stdout as they arrive, denoising progress is drawn as a bar on
  stderr, and each image is saved as `DIR/round{r}.png` with the texts beside it (`texts.json`,
  `texts.md`) and the summary (`result.json`, `"status": "failed"` and the error when it fails).
- `irg [--server URL] health` prints /health and /ready; exit 0 only when ready.
The server URL and API key also come from `IRG_SERVER` and `IRG_API_KEY`.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO, get_args

import httpx

from server.protocol import Recipe

DEFAULT_SERVER = "http://127.0.0.1:8000"
BAR_WIDTH = 30
OUTPUTS = ("round*.png", "texts.json", "texts.md", "result.json")
EXIT_RETRYABLE = 3  # 429 / 503: try again later


def sse_events(response: httpx.Response):
    """(event, data) pairs of an SSE response; comments (keep-alives) are skipped."""
    event, data = None, []
    for line in response.iter_lines():
        if not line:
            if data:
                yield event or "message", json.loads("\n".join(data))
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


class Printer:
    """Terminal output of one stream: texts to `out`, progress bars to `err`."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out, self.err = out, err
        self.text_open: tuple[str, int] | None = None
        self.bar_open = False

    def _end_bar(self) -> None:
        if self.bar_open:
            self.err.write("\n")
            self.bar_open = False

    def text(self, stage: str, round: int, delta: str) -> None:
        self._end_bar()
        if self.text_open != (stage, round):
            self.out.write(f"\n[{stage} {round}] ")
            self.text_open = (stage, round)
        self.out.write(delta)
        self.out.flush()

    def progress(self, round: int, step: int, total: int) -> None:
        if self.text_open is not None:
            self.out.write("\n")
            self.out.flush()
            self.text_open = None
        filled = BAR_WIDTH * step // max(total, 1)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        self.err.write(f"\rimage {round} [{bar}] {step}/{total}")
        self.err.flush()
        self.bar_open = True

    def line(self, message: str) -> None:
        self._end_bar()
        if self.text_open is not None:
            self.out.write("\n")
            self.text_open = None
        self.err.write(message + "\n")
        self.err.flush()


def request_body(args: argparse.Namespace) -> dict:
    body = {"prompt": args.prompt, "recipe": args.recipe, "stream": True}
    for name in (
        "width",
        "height",
        "seed",
        "num_timesteps",
        "max_think_tokens",
        "temperature",
        "refine_rounds",
        "partial_images",
        "timeout_s",
    ):
        value = getattr(args, name)
        if value is not None:
            body[name] = value
    if args.image is not None:
        body["image"] = base64.b64encode(args.image.read_bytes()).decode("ascii")
    return body


def save_texts(out: Path, prompt: str, model: str, texts: list[dict]) -> None:
    (out / "texts.json").write_text(
        json.dumps(texts, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    parts = [f"## {t['stage']} (round {t['round']})\n\n{t['text']}" for t in texts]
    (out / "texts.md").write_text(
        f"# {prompt}\n\nmodel: {model}\n\n" + "\n\n".join(parts) + "\n", encoding="utf-8"
    )


def generate(args: argparse.Namespace, client: httpx.Client, out: TextIO, err: TextIO) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    # Outputs of an earlier run in the same folder must not pass for this one's.
    for pattern in OUTPUTS:
        for stale in args.out.glob(pattern):
            stale.unlink()
    printer = Printer(out, err)
    texts: dict[tuple[str, int], str] = {}

    def failed(code: str, message: str, status: int | None = None, exit_code: int = 1) -> int:
        printer.line(f"error{f' {status}' if status else ''}: {code}: {message}")
        error = {"code": code, "message": message, **({"status": status} if status else {})}
        parts = [{"stage": s, "round": r, "text": t} for (s, r), t in texts.items()]
        (args.out / "result.json").write_text(
            json.dumps({"status": "failed", "error": error, "texts": parts}, indent=2) + "\n",
            encoding="utf-8",
        )
        return exit_code

    with client.stream("POST", "/generate", json=request_body(args)) as response:
        if response.status_code != 200:
            response.read()
            code, message = error_parts(response)
            if retry := response.headers.get("retry-after"):
                message += f" (retry after {retry} s)"
            retryable = response.status_code in (429, 503)
            exit_code = EXIT_RETRYABLE if retryable else 1
            return failed(code, message, response.status_code, exit_code)
        try:
            return stream_events(args, response, printer, texts, failed)
        except httpx.TimeoutException:
            return failed("timeout", f"no data from the server for {args.timeout:g} s (--timeout)")
        except (httpx.TransportError, httpx.DecodingError) as exc:
            return failed("connection_lost", f"the stream broke off: {exc}")
        except json.JSONDecodeError as exc:
            return failed("bad_event", f"the server sent an unreadable event: {exc}")
        except KeyboardInterrupt:  # leaving the `with` closes the stream: the server aborts it
            return failed("interrupted", "interrupted", exit_code=130)


def stream_events(
    args: argparse.Namespace,
    response: httpx.Response,
    printer: Printer,
    texts: dict[tuple[str, int], str],
    failed: Callable[[str, str], int],
) -> int:
    """Print and save the stream's events; the exit code. `texts` collects the text so far
    (for a failed run's result.json); `failed(code, message)` ends a run that failed."""
    for event, data in sse_events(response):
        if event == "queued":
            printer.line(f"queued (position {data['position']})")
        elif event == "text.delta":
            key = (data["stage"], data["round"])
            texts[key] = texts.get(key, "") + data["delta"]
            printer.text(data["stage"], data["round"], data["delta"])
        elif event == "image.progress":
            printer.progress(data["round"], data["step"], data["total_steps"])
        elif event == "image.partial":
            path = args.out / f"round{data['round']}.partial{data['index']}.png"
            path.write_bytes(base64.b64decode(data["b64_png"]))
        elif event == "image.done":
            path = args.out / f"round{data['round']}.png"
            path.write_bytes(base64.b64decode(data["b64_png"]))
            printer.line(f"saved {path} ({data['width']}x{data['height']})")
        elif event == "done":
            save_texts(args.out, args.prompt, data["model"], data["texts"])
            (args.out / "result.json").write_text(
                json.dumps({"status": "ok", **data}, indent=2) + "\n", encoding="utf-8"
            )
            total = data["timings"].get("total", 0.0)
            printer.line(f"done in {total:.1f}s: {data['model']}, seed {data['seed']}")
            return 0
        elif event == "error":
            return failed(data["code"], data["message"])
    return failed("incomplete", "the stream ended without a result")


def error_parts(response: httpx.Response) -> tuple[str, str]:
    """(code, message) of an error answer; its text where it is not the server's JSON shape."""
    try:
        error = response.json()["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return "http_error", response.text[:500]


def health(client: httpx.Client, out: TextIO) -> int:
    live = client.get("/health")
    ready = client.get("/ready")
    out.write(f"health: {live.status_code} {live.text}\nready: {ready.status_code} {ready.text}\n")
    # /health and /ready take no key: ask a route that does, so a wrong key shows here.
    models = client.get("/v1/models")
    if models.status_code == 401:
        out.write(f"auth: 401 {': '.join(error_parts(models))}\n")
        return 1
    return 0 if ready.status_code == 200 else 1


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: after `generate`, `--timeout` (a top-level flag) would be taken for
    # `--timeout-s`, the server-side deadline.
    p = argparse.ArgumentParser(
        prog="irg", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument(
        "--server",
        default=os.environ.get("IRG_SERVER", DEFAULT_SERVER),
        help=f"server URL [env IRG_SERVER; default {DEFAULT_SERVER}]",
    )
    p.add_argument("--api-key", default=os.environ.get("IRG_API_KEY"), help="[env IRG_API_KEY]")
    p.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="seconds without any data from the server (keep-alives count) before giving up",
    )
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser(
        "generate", help="stream one request and save its images and texts", allow_abbrev=False
    )
    g.add_argument("prompt")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--recipe", default="irg", choices=get_args(Recipe))
    g.add_argument("--image", type=Path, help="input image (edit, understand)")
    for name, kind in (
        ("width", int),
        ("height", int),
        ("seed", int),
        ("num-timesteps", int),
        ("max-think-tokens", int),
        ("temperature", float),
        ("refine-rounds", int),
        ("partial-images", int),
        ("timeout-s", float),
    ):
        what = "server-side deadline, seconds " if name == "timeout-s" else ""
        g.add_argument(f"--{name}", type=kind, default=None, help=f"{what}(default: the server's)")
    sub.add_parser("health", help="print /health and /ready; exit 0 when ready")
    return p


def main(
    argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    if out is None or err is None:
        # The model's text may hold characters the terminal's encoding cannot show.
        for stream in (sys.stdout, sys.stderr):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="replace")
    out, err = out or sys.stdout, err or sys.stderr
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        try:  # bytes from the shell that are not UTF-8 arrive as lone surrogates
            args.prompt.encode("utf-8")
        except UnicodeEncodeError:
            err.write("error: the prompt is not valid UTF-8\n")
            return 1
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(10.0, read=args.timeout)
    try:
        with httpx.Client(base_url=args.server, headers=headers, timeout=timeout) as client:
            if args.command == "health":
                return health(client, out)
            return generate(args, client, out, err)
    except httpx.HTTPError as exc:
        err.write(f"error: cannot reach {args.server}: {exc}\n")
        return 2
    except OSError as exc:  # --out not writable, --image missing, a full disk
        err.write(f"\nerror: {exc}\n")
        return 1
    except KeyboardInterrupt:
        err.write("\ninterrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
