"""The playground page (GET /) in a real browser against the real server on the tiny model.

`python -m server` runs in a subprocess; Debian's headless Chromium, driven by Playwright, opens
the page, fills the form as a person would and watches the live view: think text, both images
with their round labels, errors beside the controls that caused them, a 429 while the server is
busy, and cancel aborting the request on the server (its /metrics count the abort). Screenshots
of the finished page land in the test's tmp folder; with IRG_PLAYGROUND_SCREENSHOT=PATH the
desktop one is also written to PATH (how docs/playground.png is made).

Skipped when Chromium (/usr/bin/chromium, or IRG_CHROMIUM) or the playwright package is missing.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.server_fixtures import ServerProcess, metric, wait_for

CHROMIUM = os.environ.get("IRG_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
KEY = "playground-key"
THINK_CAP = 64  # the server's caps, which the form takes from /openapi.json
SIDE_CAP = 512
PROMPT_CAP = 32  # a limit only the server can check (tokens): the validation test goes over it
TIMEOUT_MS = 30_000
ABORTS = 'irg_requests_finished_total{reason="abort"}'
REJECTED = 'irg_requests_finished_total{reason="rejected"}'

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def start_server(tiny_dir: Path, **env: str) -> ServerProcess:
    proc = ServerProcess(
        {
            "IRG_MODEL": str(tiny_dir),
            "IRG_LOG_LEVEL": "warning",
            "IRG_KEEPALIVE_INTERVAL": "0.5",
            # One request at a time and no queue: a second request while one runs gets 429.
            "IRG_MAX_RUNNING": "1",
            "IRG_MAX_QUEUED": "0",
            "IRG_MAX_THINK_TOKENS": str(THINK_CAP),
            "IRG_MAX_IMAGE_SIDE": str(SIDE_CAP),
            "IRG_MAX_PROMPT_TOKENS": str(PROMPT_CAP),
            **env,
        }
    )
    try:
        proc.wait_ready()
    except BaseException:
        print(proc.stop())
        raise
    return proc


@pytest.fixture(scope="module")
def server(tiny_dir, browser):
    proc = start_server(tiny_dir)
    yield proc
    proc.stop()


def metrics(server, key: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(server.url + "/metrics", headers=headers, timeout=10).text


class Page:
    """One browser tab on the playground, with what a person would do on it."""

    def __init__(self, browser, url: str, width: int = 1280, height: int = 900) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.problems: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.url = url
        self.page.goto(url + "/")

    def _console(self, msg) -> None:
        # A 4xx answer the page handles is logged by Chromium as a failed resource load.
        if msg.type == "error" and "Failed to load resource" not in msg.text:
            self.problems.append(f"console: {msg.text}")

    def close(self) -> None:
        self.context.close()

    def set_key(self, key: str) -> None:
        page = self.page
        if not page.locator("#api_key").is_visible():
            page.click("#key-box > summary")
        page.fill("#api_key", key)
        page.locator("#api_key").dispatch_event("change")

    def fill(self, prompt: str, **advanced: object) -> None:
        page = self.page
        page.fill("#prompt", prompt)
        for name in ("width", "height", "seed", "partial_images"):
            if name in advanced:
                value = str(advanced.pop(name))
                if name == "partial_images":
                    page.select_option("#partial_images", value)
                else:
                    page.fill(f"#{name}", value)
        if advanced:
            if not page.locator("#num_timesteps").is_visible():
                page.click("#advanced > summary")
            for name, value in advanced.items():
                page.fill(f"#{name}", str(value))

    def stage_now(self) -> str:
        return self.page.inner_text("#stage-now")

    def wait_stage(self, pattern: str) -> None:
        self.page.wait_for_function(
            "p => new RegExp(p).test(document.getElementById('stage-now').textContent)", arg=pattern
        )


def fast_irg(page: Page, **overrides: object) -> None:
    settings = {
        "width": 64,
        "height": 64,
        "seed": 7,
        "partial_images": 1,
        "num_timesteps": 3,
        "max_think_tokens": 6,
    }
    page.fill("a red fox in fresh snow", **{**settings, **overrides})


UNLABELLED = """() => [...document.querySelectorAll("input, select, textarea, button")]
    .filter(c => !(c.labels && c.labels.length) && !c.getAttribute("aria-labelledby")
                 && !c.getAttribute("aria-label") && !c.textContent.trim())
    .map(c => c.outerHTML)"""


def test_irg_request_streams_thoughts_and_both_images(browser, server, tmp_path):
    tab = Page(browser, server.url)
    page = tab.page
    try:
        assert page.title() == "IRG playground"
        assert page.evaluate(UNLABELLED) == []
        assert page.evaluate("() => document.styleSheets[0].cssRules.length") > 50
        page.wait_for_selector("#server-status[data-state=ok]")
        assert "irg-tiny-random" in page.inner_text("#server-status")

        fast_irg(tab)
        page.click("#generate")
        page.wait_for_selector("#stages li[data-key=done].done")
        assert tab.stage_now().startswith("Done in")

        # Streamed texts, per stage, in their rounds.
        think = page.inner_text(".round[data-round='1'] .text.think .stream")
        reflect = page.inner_text(".round[data-round='2'] .text.reflect .stream")
        assert think.strip() and reflect.strip()
        # Two final images side by side, labelled by round, each with its download.
        labels = page.locator(".round .round-label").all_inner_texts()
        assert labels == ["Round 1 · first image", "Round 2 · refined image"]
        for r in (1, 2):
            img = page.locator(f".round[data-round='{r}'] img.result")
            assert img.evaluate("i => i.complete && i.naturalWidth") == 64
            assert "partial" not in (img.get_attribute("class") or "")
            link = page.locator(f".round[data-round='{r}'] a.download")
            assert link.is_visible()
            assert link.get_attribute("download").endswith(f"round{r}.png")
            assert link.get_attribute("href").startswith("blob:")
        boxes = [
            page.locator(f".round[data-round='{r}'] img.result").bounding_box() for r in (1, 2)
        ]
        assert abs(boxes[0]["y"] - boxes[1]["y"]) < 2 and boxes[0]["x"] < boxes[1]["x"]
        # Every stage was passed through, and timed.
        stages = page.locator("#stages li").all_inner_texts()
        assert len(stages) == 6
        assert page.locator("#stages li.done").count() == 6
        timings = page.inner_text("#timings")
        for name in ("Waiting", "Thinking", "Image 1", "Reflecting", "Image 2", "Total (server)"):
            assert name in timings
        assert page.inner_text("#seed-used").startswith("Seed 7.")

        page.click("#advanced > summary")  # folded again, as a visitor first sees the page
        page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
        if os.environ.get("IRG_PLAYGROUND_SCREENSHOT"):
            page.screenshot(path=os.environ["IRG_PLAYGROUND_SCREENSHOT"], full_page=True)
        print(f"screenshot: {tmp_path / 'playground.png'}")

        # Nothing was fetched from anywhere but the server.
        others = [u for u in tab.requests if not u.startswith((server.url, "data:", "blob:"))]
        assert others == []
        assert tab.problems == []
    finally:
        tab.close()


def test_readable_at_phone_width(browser, server, tmp_path):
    tab = Page(browser, server.url, width=390, height=844)
    page = tab.page
    try:
        fast_irg(tab)
        page.click("#generate")
        page.wait_for_selector("#stages li[data-key=done].done")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        # The live view scrolled into sight; rounds stack on a phone.
        assert abs(page.locator("#results").bounding_box()["y"]) < 2
        boxes = [page.locator(f".round[data-round='{r}']").bounding_box() for r in (1, 2)]
        assert boxes[1]["y"] >= boxes[0]["y"] + boxes[0]["height"]
        # What the phone shows: the page scrolled itself to the live view.
        page.screenshot(path=str(tmp_path / "playground-phone.png"))
        assert tab.problems == []
    finally:
        tab.close()


def test_errors_show_beside_their_controls(browser, server):
    tab = Page(browser, server.url)
    page = tab.page
    try:
        # A limit only the server knows (the prompt's length in tokens): its 400 names the
        # parameter and the limit, and the page shows it beside the prompt.
        fast_irg(tab)
        page.fill("#prompt", "a red fox " * PROMPT_CAP)
        page.focus("#prompt")
        page.keyboard.press("Control+Enter")  # the keyboard shortcut submits
        page.wait_for_selector("#err-prompt:not([hidden])")
        message = page.inner_text("#err-prompt")
        assert f"over the limit of {PROMPT_CAP}" in message, message
        assert page.get_attribute("#prompt", "aria-invalid") == "true"
        assert page.evaluate("document.activeElement.id") == "prompt"
        assert page.locator("#err-request").is_hidden()

        # Values the browser already knows are wrong never reach the server: a size off the
        # 16 grid, and a think length over the cap the form read from the server.
        page.fill("#prompt", "a red fox in fresh snow")
        assert page.locator("#err-prompt").is_hidden()  # editing clears the message
        before = len(tab.requests)
        page.fill("#max_think_tokens", str(THINK_CAP + 1))
        page.click("#generate")
        page.wait_for_selector("#err-max_think_tokens:not([hidden])")
        assert len(tab.requests) == before
        page.fill("#max_think_tokens", "6")
        page.fill("#width", "40")
        before = len(tab.requests)
        page.click("#generate")
        page.wait_for_selector("#err-width:not([hidden])")
        assert page.get_attribute("#width", "aria-invalid") == "true"
        assert len(tab.requests) == before

        # A deadline the request cannot meet: the timeout is shown beside the deadline field.
        fast_irg(tab, num_timesteps=200, timeout_s=0.2)
        page.click("#generate")
        page.wait_for_selector("#err-timeout_s:not([hidden])")
        assert "deadline of 0.2 s" in page.inner_text("#err-timeout_s")
        assert tab.stage_now().startswith(("Failed", "Not started"))
        page.fill("#timeout_s", "")

        # An edit needs an input image: said beside the drop zone.
        page.fill("#width", "64")
        page.select_option("#recipe", "edit")
        page.click("#generate")
        page.wait_for_selector("#err-image:not([hidden])")
        assert page.locator("#drop").is_visible()
        assert tab.problems == []
    finally:
        tab.close()


def test_form_offers_only_what_the_server_accepts(browser, server):
    tab = Page(browser, server.url)
    page = tab.page
    try:
        page.wait_for_selector(f"#width[max='{SIDE_CAP}']")
        # The paper's 1024x1024 default is lowered to this server's cap, and so is the hint.
        assert page.input_value("#width") == page.input_value("#height") == str(SIDE_CAP)
        assert f"at most {SIDE_CAP}." in page.inner_text("#size-hint")
        assert page.locator("[data-size='1024x1024']").is_hidden()
        assert page.locator(".presets").is_visible()  # 256² and 512² remain
        assert page.get_attribute("#max_think_tokens", "max") == str(THINK_CAP)
        assert page.get_attribute("#num_timesteps", "max") == "200"  # not capped: the model's
        assert tab.problems == []
    finally:
        tab.close()


def png_bytes(size: int = 48) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


def test_an_emptied_setting_is_refused_not_sent_as_zero(browser, server):
    tab = Page(browser, server.url)
    page = tab.page
    try:
        fast_irg(tab, temperature="")  # Number("") is 0: greedy decoding nobody asked for
        page.click("#generate")
        assert page.evaluate("document.getElementById('temperature').validity.valueMissing")
        page.wait_for_timeout(300)
        assert not [url for url in tab.requests if url.endswith("/generate")]
    finally:
        tab.close()


def test_input_image_by_file_picker_and_by_drop(browser, server):
    tab = Page(browser, server.url)
    page = tab.page
    try:
        fast_irg(tab, max_think_tokens=4)
        page.select_option("#recipe", "understand")
        assert page.is_disabled("#width")  # no image is drawn for an answer
        page.fill("#prompt", "what is in this picture?")
        picked = {"name": "red.png", "mimeType": "image/png", "buffer": png_bytes()}
        page.set_input_files("#image", files=[picked])
        page.wait_for_selector("#image-preview:not([hidden])")
        assert page.get_attribute("#image-preview", "alt") == "Input image: red.png"

        # Drag and drop onto the zone works as well.
        page.click("#image-clear")
        assert page.locator("#image-preview").is_hidden()
        transfer = page.evaluate_handle(
            """bytes => {
                const dt = new DataTransfer();
                dt.items.add(new File([new Uint8Array(bytes)], "drop.png", {type: "image/png"}));
                return dt;
            }""",
            list(png_bytes(32)),
        )
        page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
        page.wait_for_selector("#image-preview:not([hidden])")
        assert page.get_attribute("#image-preview", "alt") == "Input image: drop.png"

        # A file that is not an image drops the one before: that one must not be sent instead.
        notes = {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a picture"}
        page.set_input_files("#image", files=[notes])
        page.wait_for_selector("#err-image:not([hidden])")
        assert page.locator("#image-preview").is_hidden()
        page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
        page.wait_for_selector("#image-preview:not([hidden])")

        page.click("#generate")
        page.wait_for_selector("#stages li[data-key=done].done")
        assert page.locator(".round .round-label").all_inner_texts() == ["Answer"]
        assert page.inner_text(".text.answer .stream").strip()
        assert page.locator(".round figure").is_hidden()
        assert tab.problems == []
    finally:
        tab.close()


def test_cancel_aborts_the_request_and_a_busy_server_says_when_to_retry(browser, server):
    aborts = metric(metrics(server), ABORTS)
    rejected = metric(metrics(server), REJECTED)
    first, second = Page(browser, server.url), Page(browser, server.url)
    try:
        # Several seconds of denoising on two CPU cores (at 64 px a fast VM needs ~1.6 s).
        fast_irg(first, num_timesteps=200, width=256, height=256)
        first.page.click("#generate")
        first.wait_stage(r"^Image 1 · step \d+ of 199$")
        assert first.page.is_enabled("#cancel")
        assert first.page.get_attribute("#generate", "aria-disabled") == "true"

        # The only slot is taken: 429, and the page says when to try again.
        fast_irg(second)
        second.page.click("#generate")
        second.page.wait_for_selector("#err-request:not([hidden])")
        assert "busy" in second.page.inner_text("#err-request")
        assert "Try again in" in second.page.inner_text("#err-request")
        assert metric(metrics(server), REJECTED) == rejected + 1

        first.page.click("#cancel")
        first.wait_stage("^Cancelled")
        assert first.page.locator("#stages li.failed").count() == 1
        assert first.page.locator("#stages li[data-key=done].done").count() == 0
        assert first.page.get_attribute("#generate", "aria-disabled") is None
        assert first.page.is_disabled("#cancel")
        assert wait_for(lambda: metric(metrics(server), ABORTS) == aborts + 1, timeout=10)
        assert first.problems == [] and second.problems == []
    finally:
        first.close()
        second.close()


def test_api_key_is_entered_once(browser, tiny_dir):
    keyed = start_server(tiny_dir, IRG_API_KEY=KEY)
    tab = None
    try:
        # The page itself must load without the key: a browser cannot send one for it.
        for path in ("/", "/static/app.js", "/static/style.css"):
            status = httpx.get(keyed.url + path, timeout=10).status_code
            assert status == 200, (
                f"GET {path} answers {status} with an API key configured: the page and its "
                "static files must stay open (server/auth.py), like /health and /ready"
            )
        tab = Page(browser, keyed.url)
        page = tab.page
        # No key yet: the 401 is shown at the key field, which gets the focus.
        fast_irg(tab)
        page.click("#generate")
        page.wait_for_selector("#err-api_key:not([hidden])")
        assert "needs an API key" in page.inner_text("#err-api_key")
        assert page.evaluate("document.activeElement.id") == "api_key"
        # A wrong key is refused; the right one works, and is still there after a reload.
        tab.set_key("wrong")
        page.click("#generate")
        # (A function, not an expression: the page's CSP forbids eval, which an expression needs.)
        page.wait_for_function(
            "() => document.getElementById('err-api_key').textContent.includes('refused')"
        )
        tab.set_key(KEY)
        page.reload()
        assert page.input_value("#api_key") == KEY
        fast_irg(tab)
        page.click("#generate")
        page.wait_for_selector("#stages li[data-key=done].done")
        assert page.locator("#err-api_key").is_hidden()
        assert metric(metrics(keyed, KEY), 'irg_requests_finished_total{reason="ok"}') == 1
        assert tab.problems == []
    finally:
        if tab is not None:
            tab.close()
        keyed.stop()
