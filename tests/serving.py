"""Helpers of the serving tests: a tiny random model, and a real uvicorn server on a free local port in a thread."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from PIL import Image
from tiny import TINY_CLIP, lm_config
from transformers import AutoTokenizer

from openflamingo import CrossAttentionConfig, FlamingoConfig, PerceiverConfig, VisionConfig, build_flamingo
from openflamingo.serve.app import Settings, create_app
from openflamingo.serve.engine import Engine
from openflamingo.serve.http import server_config
from openflamingo.serve.images import ImagePolicy
from openflamingo.serve.protocol import Limits

MODEL = "tiny-flamingo"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread than on two that spin-wait on each other on a busy machine; the engine
    thread inherits the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(tokenizer_dir, seed: int = 0):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = FlamingoConfig(
        language_model_config=lm_config("llama", tokenizer),
        tokenizer=str(tokenizer_dir),
        vision=VisionConfig("hf_clip", config=TINY_CLIP),
        perceiver=PerceiverConfig(depth=1, num_latents=4, heads=2, dim_head=8),
        cross_attention=CrossAttentionConfig(every_n_layers=2, heads=2, dim_head=8, gate_init=1.0),
    )
    return build_flamingo(config, seed=seed).eval()


def settings(
    model, images: ImagePolicy | None = None, api_key: str | None = None, server=None, **limits
) -> Settings:
    """Settings with these Limits; `server` holds other Settings fields (timeouts, allowed hosts)."""
    policy = images or ImagePolicy()
    return Settings(Limits(MODEL, **limits), policy, model.config.prompt_format, api_key, **(server or {}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(
    model, server_settings: Settings, max_batch_size: int = 8, batch_wait_s: float = 0.005, **engine_options
) -> Iterator[str]:
    """The app under uvicorn on 127.0.0.1:<free port>; yields (base URL, engine)."""
    import uvicorn

    engine = Engine(model, max_batch_size=max_batch_size, batch_wait_s=batch_wait_s, **engine_options)
    app = create_app(model, engine, server_settings)
    port = free_port()
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, server_settings.read_timeout_s))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class CharTokenizer:
    """Each token is one character of `text`; decoding joins them (enough for stop handling)."""

    def __init__(self, text):
        self.text = text

    def decode(self, tokens, skip_special_tokens=True):
        return "".join(self.text[t] for t in tokens if t >= 0)


def png_bytes(color=(200, 30, 30), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(color=(200, 30, 30)) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(png_bytes(color))}}


def chromium_missing() -> str | None:
    """Why the page cannot be tested in a real browser here, or None when it can."""
    import importlib.util
    import shutil

    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install selenium; `make test` installs it)"
    for program in ("chromium", "chromedriver"):
        if shutil.which(program) is None:
            return f"{program} is not installed (apt-get install chromium chromium-driver; `make browser` does it)"
    return None


def start_chromium(width: int = 1000, height: int = 720):
    """Debian's chromium, headless, driven through its own chromedriver (no driver download)."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    # --no-sandbox: the suite runs as root in CI containers, where chromium's sandbox cannot start.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


def ask_in_page(driver, question: str, image_paths=(), timeout: float = 120) -> str:
    """Attach the images with the page's file picker, type the question, send it and wait until the streamed
    answer is complete; returns the answer's text as the page shows it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    answered = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]"))
    for path in image_paths:
        attached = len(driver.find_elements(By.CSS_SELECTOR, "#attachments img"))
        driver.find_element(By.ID, "file").send_keys(str(path))
        WebDriverWait(driver, timeout).until(
            lambda d, n=attached: len(d.find_elements(By.CSS_SELECTOR, "#attachments img")) > n
        )
    driver.find_element(By.ID, "question").send_keys(question)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, timeout).until(
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]")) > answered
            or d.find_elements(By.CSS_SELECTOR, ".msg.error")
        )
    )
    errors = driver.find_elements(By.CSS_SELECTOR, ".msg.error")
    if errors:
        raise AssertionError(f"the page shows an error: {errors[-1].text}")
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]")[-1].text
