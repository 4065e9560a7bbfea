"""Every bad request gets OpenAI's error shape with a 4xx naming what was wrong, and leaves the server working."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image
from serving import (
    MODEL,
    data_url,
    one_thread,  # noqa: F401 (an autouse fixture: tiny models run on one thread)
    png_bytes,
    running_server,
    settings,
    tiny_model,
)

from openflamingo.serve.images import ImagePolicy

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
RAW_JSON = {**AUTH, "Content-Type": "application/json"}  # for bodies sent as bytes


@pytest.fixture(scope="module")
def server(tokenizer_dir, tmp_path_factory):
    model = tiny_model(tokenizer_dir)
    allowed = tmp_path_factory.mktemp("allowed")
    (allowed / "ok.png").write_bytes(png_bytes())
    (allowed.parent / "secret.png").write_bytes(png_bytes())
    policy = ImagePolicy(max_bytes=20_000, max_pixels=100 * 100, local_dir=allowed)
    with running_server(model, settings(model, images=policy, max_images=2, max_tokens=50, api_key=KEY)) as (
        url,
        _,
    ):
        yield url, allowed


def ask(content, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}


def image(url: str, text: str = "what is it?") -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]


def png_of(size) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (9, 9, 9)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD = {  # name: (body, status, param, code)
    "unknown model": ({**ask("hi"), "model": "gpt-4o"}, 404, "model", "model_not_found"),
    "messages not a list": ({"model": MODEL, "messages": "hi"}, 400, "messages", None),
    "no messages": ({"model": MODEL, "messages": []}, 400, "messages", None),
    "unknown role": (
        {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]},
        400,
        "messages[0].role",
        None,
    ),
    "content of the wrong type": (ask(42), 400, "messages[0].content", None),
    "part of unknown type": (ask([{"type": "audio"}]), 400, "messages[0].content[0]", None),
    "text part not a string": (ask([{"type": "text", "text": 5}]), 400, "messages[0].content[0].text", None),
    "max_tokens a string": (ask("hi", max_tokens="5"), 400, "max_tokens", "invalid_type"),
    "temperature a string": (ask("hi", temperature="hot"), 400, "temperature", "invalid_type"),
    "n a boolean": (ask("hi", n=True), 400, "n", "invalid_type"),
    "stream a string": (ask("hi", stream="yes"), 400, "stream", "invalid_type"),
    "max_tokens 0": (ask("hi", max_tokens=0), 400, "max_tokens", "invalid_value"),
    "max_tokens over the server limit": (ask("hi", max_tokens=51), 400, "max_tokens", "invalid_value"),
    "temperature out of range": (ask("hi", temperature=2.5), 400, "temperature", "invalid_value"),
    "n over the batch size": (ask("hi", n=99), 400, "n", "invalid_value"),
    "five stop sequences": (ask("hi", stop=list("abcde")), 400, "stop", None),
    "unknown field": (ask("hi", best_of=2), 400, "best_of", None),
    "unsupported field": (ask("hi", logprobs=True), 400, "logprobs", None),
    "last message not the user's": (
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        },
        400,
        "messages",
        None,
    ),
    "image in an assistant message": (
        {
            "model": MODEL,
            "messages": [
                {"role": "assistant", "content": image(data_url(png_bytes()))},
                {"role": "user", "content": "hi"},
            ],
        },
        400,
        "messages[0].content[0]",
        None,
    ),
    "text with the image token": (ask("look <image> here"), 400, "messages[0].content", None),
    "not an image": (
        ask(image(data_url(b"hello, world"))),
        400,
        "messages[0].content[0].image_url",
        "invalid_image",
    ),
    "not base64": (
        ask(image("data:image/png;base64,@@@@")),
        400,
        "messages[0].content[0].image_url",
        "invalid_image",
    ),
    "not an image media type": (
        ask(image("data:text/plain;base64," + base64.b64encode(b"hi").decode())),
        400,
        "messages[0].content[0].image_url",
        "invalid_image",
    ),
    "truncated image": (
        ask(image(data_url(png_of((64, 64))[:60]))),
        400,
        "messages[0].content[0].image_url",
        "invalid_image",
    ),
    "image over the byte limit": (
        ask(image(data_url(b"\x89PNG" + bytes(30_000)))),
        400,
        "messages[0].content[0].image_url",
        "image_too_large",
    ),
    "image over the pixel limit": (
        ask(image(data_url(png_of((101, 100))))),
        400,
        "messages[0].content[0].image_url",
        "image_too_large",
    ),
    "more images than allowed": (
        ask([{"type": "image_url", "image_url": {"url": data_url(png_bytes())}}] * 3),
        400,
        "messages[0].content[2]",
        "too_many_images",
    ),
    "http image URL": (
        ask(image("http://127.0.0.1:9/cat.png")),
        400,
        "messages[0].content[0].image_url",
        "image_url_not_allowed",
    ),
    "prompt over the context": (ask("the red cat " * 700), 400, "messages", "context_length_exceeded"),
    "prompt + max_tokens over the context": (
        ask("the red cat " * 286, max_tokens=50),
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_request_gets_a_4xx_naming_the_field(server, name):
    url, _ = server
    body, status, param, code = BAD[name]
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param and error["code"] == code, error


def test_malformed_json_and_a_non_object_body(server):
    url, _ = server
    for body in (b'{"model": ', b"[1, 2]", b"\xff\xfe"):
        response = httpx.post(f"{url}/v1/chat/completions", content=body, headers=RAW_JSON, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["message"], response.text


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    url, _ = server
    response = httpx.post(
        f"{url}/v1/chat/completions", content=b"x" * 2_000_000, headers=RAW_JSON, timeout=60
    )
    assert response.status_code == 413 and "--max-image-bytes" in response.json()["error"]["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_a_missing_or_wrong_api_key_gets_401(server, headers):
    url, _ = server
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/v1/score")):
        response = httpx.request(method, f"{url}{path}", json=ask("hi"), headers=headers, timeout=60)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_local_images_only_inside_the_allowed_directory(server):
    url, allowed = server
    inside = httpx.post(
        f"{url}/v1/chat/completions", json=ask(image((allowed / "ok.png").as_uri())), headers=AUTH, timeout=60
    )
    assert inside.status_code == 200, inside.text
    for path in (f"{allowed.as_uri()}/../secret.png", (allowed.parent / "secret.png").as_uri()):
        outside = httpx.post(f"{url}/v1/chat/completions", json=ask(image(path)), headers=AUTH, timeout=60)
        assert outside.status_code == 400 and outside.json()["error"]["code"] == "image_url_not_allowed"


def test_bad_score_requests(server):
    url, _ = server
    for body, param in (
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, "candidates"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "candidates": ["a", ""]},
            "candidates[1]",
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "candidates": "a"}, "candidates"),
    ):
        response = httpx.post(f"{url}/v1/score", json=body, headers=AUTH, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_the_server_still_answers_after_bad_requests(server):
    url, _ = server
    for name in sorted(BAD):  # all of them again, at once
        httpx.post(f"{url}/v1/chat/completions", json=BAD[name][0], headers=AUTH, timeout=60)
    good = httpx.post(
        f"{url}/v1/chat/completions", json=ask(image(data_url(png_bytes()))), headers=AUTH, timeout=60
    )
    assert good.status_code == 200 and good.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    unknown = httpx.get(f"{url}/v1/nothing", headers=AUTH, timeout=10)
    assert unknown.status_code == 404 and "error" in unknown.json()


def test_http_image_urls_are_read_only_when_allowed(tmp_path):
    import functools
    import http.server
    import ipaddress
    import threading
    from dataclasses import replace

    from openflamingo.serve.errors import ApiError
    from openflamingo.serve.images import read_image

    (tmp_path / "red.png").write_bytes(png_bytes(size=(40, 30)))
    (tmp_path / "big.png").write_bytes(png_of((300, 300)))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as web:
        threading.Thread(target=web.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{web.server_address[1]}"
        # a loopback address is refused unless trusted: tests/test_serve_images.py
        local = ImagePolicy(allow_urls=True, trusted_networks=(ipaddress.ip_network("127.0.0.1/32"),))
        assert read_image(f"{base}/red.png", "part", local).size == (40, 30)
        for url, policy, code in (
            (f"{base}/red.png", ImagePolicy(), "image_url_not_allowed"),
            (f"{base}/big.png", replace(local, max_bytes=500), "image_too_large"),
            (f"{base}/missing.png", local, "invalid_image"),
        ):
            with pytest.raises(ApiError) as refused:
                read_image(url, "part", policy)
            assert refused.value.code == code and refused.value.param == "part"
        web.shutdown()
