"""The HTTP API against the real engine on the tiny model: answers, streams, probes, metrics,
the OpenAI-compatible routes."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image

from tests.server_fixtures import SMALL, live_server, metric, read_sse


@pytest.fixture(scope="module")
def server(tiny_model):
    with live_server(tiny_model) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


def png_size(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def test_probes_and_models_say_random_weights(http):
    assert http.get("/health").json()["status"] == "ok"
    assert http.head("/health").status_code == 200  # load balancers probe with HEAD too
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json()["random_weights"] is True
    models = http.get("/v1/models").json()
    card = models["data"][0]
    assert card["random_weights"] is True and "random" in card["id"]
    assert http.get(f"/v1/models/{card['id']}").json() == card  # OpenAI's models.retrieve
    missing = http.get("/v1/models/gpt-image-1")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_json_answer(http, caplog):
    body = {"prompt": "a red cube", "recipe": "think_t2i", "seed": 7, **SMALL, "width": 48}
    with caplog.at_level("INFO", logger="irg.server"):
        r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    # One line per request for the operator: id, recipe, size, time, tokens.
    assert f"request {out['id']} ok: think_t2i 48x32 in " in caplog.text
    assert out["id"] and "random" in out["model"] and out["seed"] == 7
    assert [t["stage"] for t in out["texts"]] == ["think"]
    [image] = out["images"]
    assert image["round"] == 1 and (image["width"], image["height"]) == (48, 32)
    assert png_size(image["b64_png"]) == (48, 32)
    assert out["usage"]["denoise_steps"] == SMALL["num_timesteps"] - 1
    assert out["usage"]["generated_tokens"] >= 1 and out["usage"]["prompt_tokens"] > 0
    assert out["timings"]["total"] > 0
    # The same seed gives the same image.
    assert http.post("/generate", json=body).json()["images"][0]["b64_png"] == image["b64_png"]


def collapse(names: list[str], data: list[dict]) -> list[str]:
    """Event names with stage / round, consecutive repeats merged: the shape of a stream."""
    out: list[str] = []
    for name, d in zip(names, data, strict=True):
        tag = name
        if name.startswith("text."):
            tag = f"{name}:{d['stage']}{d['round']}"
        elif name.startswith("image."):
            tag = f"{name}:{d['round']}"
        if not out or out[-1] != tag:
            out.append(tag)
    return out


def test_irg_stream_order_ids_and_payloads(http):
    body = {"prompt": "a blue bird", "stream": True, "seed": 3, **SMALL}
    with http.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        sse = read_sse(r)
    ids = [i for i, _, _ in sse.events]
    assert ids == list(range(1, len(ids) + 1))
    data = [d for _, _, d in sse.events]
    rid = data[0]["request_id"]
    assert all(d["request_id"] == rid for d in data)
    assert collapse(sse.names, data) == [
        "queued",
        "text.delta:think1",
        "text.done:think1",
        "image.progress:1",
        "image.done:1",
        "text.delta:reflect2",
        "text.done:reflect2",
        "image.progress:2",
        "image.done:2",
        "done",
    ]
    think_deltas = "".join(d["delta"] for d in sse.of("text.delta") if d["stage"] == "think")
    assert think_deltas == sse.of("text.done")[0]["text"]
    steps = [d["step"] for d in sse.of("image.progress") if d["round"] == 1]
    assert steps == [1, 2] and sse.of("image.progress")[0]["total_steps"] == 2
    done = sse.of("done")[0]
    assert done["id"] == rid and "images" not in done and len(done["texts"]) == 2
    assert all(png_size(d["b64_png"]) == (32, 32) for d in sse.of("image.done"))


def test_accept_header_streams_and_partials_arrive(http):
    body = {"prompt": "x", "recipe": "t2i", "partial_images": 2, **SMALL, "num_timesteps": 5}
    headers = {"Accept": "text/event-stream"}
    with http.stream("POST", "/generate", json=body, headers=headers) as r:
        sse = read_sse(r)
    partials = sse.of("image.partial")
    assert 1 <= len(partials) <= 2 and partials[0]["index"] == 0
    assert png_size(partials[0]["b64_png"]) == (32, 32)
    assert sse.names.index("image.partial") < sse.names.index("image.done")
    assert sse.names[-1] == "done"


def encoded_image(size=(40, 24), fmt="PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_edit_and_understand_take_an_image(http):
    # Square: the edit recipe resizes to a short side of 512, and a square keeps that cheapest.
    image = encoded_image((16, 16))
    r = http.post("/generate", json={"prompt": "bluer", "recipe": "edit", "image": image, **SMALL})
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 1
    data_url = "data:image/png;base64," + image
    r = http.post(
        "/generate",
        json={"prompt": "what?", "recipe": "understand", "image": data_url, "max_think_tokens": 4},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["images"] == [] and [t["stage"] for t in out["texts"]] == ["answer"]


def test_openai_images_json_and_stream(http):
    body = {
        "prompt": "a lighthouse",
        "size": "32x32",
        "num_timesteps": 3,
        "max_think_tokens": 4,
        "seed": 1,
        "n": 2,
    }
    r = http.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["data"]) == 2 and out["created"] > 0
    assert all(png_size(d["b64_json"]) == (32, 32) for d in out["data"])
    usage = out["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
    # OpenAI's ImagesResponse requires the details (typed clients reject an answer without them).
    assert usage["input_tokens_details"] == {
        "text_tokens": usage["input_tokens"],
        "image_tokens": 0,
    }

    body |= {"n": 1, "stream": True, "partial_images": 2, "background": "transparent"}
    with http.stream("POST", "/v1/images/generations", json=body) as r:
        sse = read_sse(r)
    assert sse.names == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [d["partial_image_index"] for d in sse.of("image_generation.partial_image")] == [0, 1]
    completed = sse.of("image_generation.completed")[0]
    assert completed["type"] == "image_generation.completed"
    assert completed["background"] == "opaque"  # what was drawn (RGB), not what was asked
    assert png_size(completed["b64_json"]) == (32, 32) and completed["usage"]["total_tokens"] > 0


def test_openai_stream_without_refine_rounds_sends_every_partial_image(http):
    # No earlier round's image stands in for a preview: all of them are previews of the one.
    body = {"prompt": "a lighthouse", "size": "32x32", "num_timesteps": 5, "max_think_tokens": 4}
    body |= {"seed": 1, "refine_rounds": 0, "stream": True, "partial_images": 2}
    with http.stream("POST", "/v1/images/generations", json=body) as r:
        sse = read_sse(r)
    assert sse.names == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]


def test_openai_null_fields_take_their_defaults(http):
    # What OpenAI's Python client sends for arguments given as None.
    body = {"prompt": "a lighthouse", "size": "32x32", "num_timesteps": 3, "max_think_tokens": 4}
    nulls = dict.fromkeys(["n", "response_format", "output_format", "stream", "partial_images"])
    r = http.post("/v1/images/generations", json={**body, **nulls, "seed": None})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1
    r = http.post("/v1/images/generations", json={**body, "prompt": None})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = http.post("/v1/images/generations", json={**body, "sise": None})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sise"


def test_openai_errors_use_the_same_shape(http):
    r = http.post("/v1/images/generations", json={"prompt": "x", "size": "100x100"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "size"
    assert r.json()["error"]["type"] == "invalid_request_error"  # what OpenAI's clients read
    r = http.post("/v1/images/generations", json={"prompt": "x", "response_format": "url"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


def test_metrics_are_exposed_with_their_names(http):
    # A think and an image of its own: every histogram below sees this request, run alone too.
    http.post("/generate", json={"prompt": "m", "recipe": "think_t2i", **SMALL})
    text = http.get("/metrics").text
    for name in (
        "irg_requests_running",
        "irg_requests_waiting",
        "irg_kv_blocks_used",
        "irg_kv_blocks_total",
        "irg_engine_healthy",
        "irg_tokens_decoded_total",
        "irg_denoise_steps_total",
        "irg_prompt_tokens_total",
    ):
        metric(text, name)
    for hist in (
        "irg_time_to_first_think_token_seconds",
        "irg_time_to_first_image_seconds",
        "irg_e2e_request_latency_seconds",
        "irg_queue_time_seconds",
    ):
        assert metric(text, hist + "_count") >= 1
    for reason in ("ok", "abort", "error", "timeout", "rejected"):
        metric(text, f'irg_requests_finished_total{{reason="{reason}"}}')
    assert metric(text, 'irg_requests_finished_total{reason="ok"}') >= 1


def test_unknown_route_and_method(http):
    assert http.get("/nope").json()["error"]["code"] == "not_found"
    assert http.get("/generate").status_code == 405


def test_openapi_schema_is_served(http):
    schema = http.get("/openapi.json").json()
    assert {"/generate", "/v1/images/generations", "/health", "/ready"} <= set(schema["paths"])
    assert isinstance(httpx.Response(200).status_code, int)


def test_a_body_of_millions_of_tiny_json_values_is_refused_before_parsing(http):
    # Parsed on the event loop, 1.5M keys held every stream for ~1 s; counted as it arrives,
    # it is refused at the limit (commas and colons) without being parsed.
    values = b'{"prompt": "x", "a": [' + b"0," * 200_000 + b"0]}"
    r = http.post("/generate", content=values, headers={"content-type": "application/json"})
    error = r.json()["error"]
    assert r.status_code == 400 and (error["code"], error["param"]) == ("body_too_complex", "body")
    assert error["limit"] == 100_000 + 16 * 4096  # room for a prompt of 4,096 tokens of commas
    # A prompt of commas under that limit reaches the prompt's own check.
    r = http.post("/generate", json={"prompt": "," * 60_000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
