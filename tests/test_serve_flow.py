"""Backpressure, deadlines, cancellation and shutdown, and what the server exposes: a full waiting line is a 429, a
request past its deadline a 504, a client that leaves frees its batch rows at the next step, SIGTERM drains; without
an API key only this machine's names are served, the page is locked down, the key never has to be on the command
line."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serving import (
    MODEL,
    free_port,
    image_part,
    one_thread,  # noqa: F401 (an autouse fixture: tiny models run on one thread)
    running_server,
    settings,
    tiny_model,
)

from openflamingo import save_pretrained
from openflamingo.serve.app import Settings
from openflamingo.serve.engine import GenerationJob
from openflamingo.serve.sampling import Sampling

QUESTION = [{"role": "user", "content": [image_part(), {"type": "text", "text": "what is it?"}]}]


def ask(max_tokens: int = 3, **fields) -> dict:
    return {"model": MODEL, "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0, **fields}


@pytest.fixture(scope="module")
def model(tokenizer_dir):
    return tiny_model(tokenizer_dir)


@contextlib.contextmanager
def engine_held(engine, model):
    """The engine thread busy inside a request (its first token's callback waits) until the block exits."""
    release, entered = threading.Event(), threading.Event()

    def emit(event) -> None:
        entered.set()
        release.wait(60)

    ids = model.tokenizer("hello")["input_ids"]
    engine.submit(GenerationJob(ids, None, 1, [], [Sampling(0.0, 1.0)], emit))
    assert entered.wait(30)
    try:
        yield
    finally:
        release.set()


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@contextlib.contextmanager
def slow_decoding(model, seconds: float = 0.02):
    """Every language-model forward takes `seconds` longer, so a long answer outlives a client's patience."""
    handle = model.language_model.register_forward_pre_hook(lambda *_: time.sleep(seconds))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def no_stop_tokens(engine):
    """Answers run to max_tokens (a random tiny model may end its answer at any step)."""
    kept, engine.stop_token_ids = engine.stop_token_ids, set()
    try:
        yield
    finally:
        engine.stop_token_ids = kept


# ----- backpressure and deadlines -------------------------------------------------------------------------------
def test_a_full_waiting_line_is_a_429_with_retry_after(model):
    with running_server(model, settings(model), max_queue=2) as (url, engine), engine_held(engine, model):
        waiting = [
            threading.Thread(
                target=httpx.post, args=(f"{url}/v1/chat/completions",), kwargs={"json": ask(), "timeout": 60}
            )
            for _ in range(2)
        ]
        for thread in waiting:
            thread.start()
        wait_until(lambda: engine.queued == 2)
        refused = httpx.post(f"{url}/v1/chat/completions", json=ask(), timeout=60)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1", refused.text
        assert "--max-queue" in refused.json()["error"]["message"]
    for thread in waiting:
        thread.join(60)


def test_a_request_past_its_deadline_is_a_504_and_never_runs(model):
    server = settings(model, server={"request_timeout_s": 0.5})
    with running_server(model, server) as (url, engine):
        with engine_held(engine, model):
            prefills = engine.prefills
            started = time.monotonic()
            late = httpx.post(f"{url}/v1/chat/completions", json=ask(), timeout=60)
            assert late.status_code == 504 and late.json()["error"]["code"] == "request_timeout", late.text
            assert time.monotonic() - started < 10
        wait_until(lambda: engine.queued == 0 and engine.rows == 0)
        assert engine.prefills == prefills  # the late request left the line unprefilled


def test_health_reports_a_stalled_or_stopped_engine(model):
    with running_server(model, settings(model, server={"stall_s": 0.3})) as (url, engine):
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        with engine_held(engine, model):
            time.sleep(0.5)
            stalled = httpx.get(f"{url}/health", timeout=10)
            assert stalled.status_code == 503 and "stalled" in stalled.json()["status"]
        engine.stop()
        assert httpx.get(f"{url}/health", timeout=10).status_code == 503
        refused = httpx.post(f"{url}/v1/chat/completions", json=ask(), timeout=60)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"


# The engine thread this test kills reports its exception.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_when_the_engine_thread_dies_waiting_and_new_requests_get_a_503(model, monkeypatch):
    with running_server(model, settings(model)) as (url, engine):
        answers = []
        with engine_held(engine, model):
            waiting = threading.Thread(
                target=lambda: answers.append(
                    httpx.post(f"{url}/v1/chat/completions", json=ask(), timeout=60)
                )
            )
            waiting.start()
            wait_until(lambda: engine.queued == 1)

            def die() -> None:
                raise SystemExit  # not an Exception: the engine loop's own handler does not catch it

            monkeypatch.setattr(engine, "_collect", die)
        waiting.join(60)
        assert answers[0].status_code == 503 and answers[0].json()["error"]["code"] == "unavailable"
        assert not engine.alive and httpx.get(f"{url}/health", timeout=10).status_code == 503
        assert httpx.post(f"{url}/v1/chat/completions", json=ask(), timeout=60).status_code == 503


# ----- cancellation -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_client_that_disconnects_frees_its_rows_at_the_next_steps(model, stream):
    with (
        running_server(model, settings(model, max_tokens=300)) as (url, engine),
        slow_decoding(model),
        no_stop_tokens(engine),
    ):
        body = ask(max_tokens=300, stream=stream)
        if stream:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
                lines = response.iter_lines()  # kept: a dropped iterator closes the response at once
                assert next(lines).startswith("data: ")
                wait_until(lambda: engine.rows == 1)
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
        steps = engine.steps
        wait_until(lambda: engine.rows == 0, timeout=10)
        assert engine.steps - steps < 50  # not the 300 the answer would have taken


def test_a_score_request_whose_client_left_is_never_run(model):
    with running_server(model, settings(model)) as (url, engine):
        with engine_held(engine, model):
            body = {"model": MODEL, "messages": QUESTION, "candidates": ["red", "blue square"]}
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/score", json=body, timeout=httpx.Timeout(60, read=0.5))
            wait_until(lambda: engine.queued == 1)
            # The held engine has not taken it from its inbox yet: the disconnect reaches the handler, which cancels it.
            wait_until(lambda: all(job.cancelled.is_set() for job in list(engine._queue.queue)))
        wait_until(lambda: engine.queued == 0)
        assert engine.score_steps == 0
        answered = httpx.post(f"{url}/v1/score", json=body, timeout=60)
        assert (
            answered.status_code == 200 and engine.score_steps == 2
        )  # the prompt, then "blue square"'s call


def test_sigterm_drains_running_requests_and_exits_0(model, tmp_path):
    save_pretrained(model, tmp_path / "tiny", include_backbones=True)
    port = free_port()
    command = [sys.executable, "-m", "openflamingo.cli", "serve", "--checkpoint", str(tmp_path / "tiny"),
               "--port", str(port), "--shutdown-grace", "20"]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "openflamingo serve" in server.stdout.readline()
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {**ask(max_tokens=40, stream=True), "model": "tiny"}
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            server.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]", rest[-3:]
        assert server.wait(60) == 0, server.stderr.read()
    finally:
        server.kill()


# ----- exposure ----------------------------------------------------------------------------------------------------
def test_without_an_api_key_only_local_and_allowed_host_names_are_served(model):
    with running_server(model, settings(model, server={"allowed_hosts": frozenset({"flamingo.lan"})})) as (
        url,
        _,
    ):
        port = url.rsplit(":", 1)[1]
        for host, status in (
            ("evil.example", 403),
            (f"evil.example:{port}", 403),
            (f"localhost:{port}", 200),
            (f"127.0.0.1:{port}", 200),
            (f"[::1]:{port}", 200),
            (f"flamingo.lan:{port}", 200),
        ):
            response = httpx.get(f"{url}/v1/models", headers={"Host": host}, timeout=10)
            assert response.status_code == status, (host, response.text)
        page = httpx.get(f"{url}/", headers={"Host": "evil.example"}, timeout=10)
        assert page.status_code == 403 and page.json()["error"]["code"] == "host_not_allowed"
    keyed = settings(model, api_key="k")
    with running_server(model, keyed) as (url, _):
        response = httpx.get(
            f"{url}/v1/models", headers={"Host": "any.example", "Authorization": "Bearer k"}, timeout=10
        )
        assert response.status_code == 200


def test_the_page_is_locked_down_and_a_non_json_post_is_refused(model):
    with running_server(model, settings(model)) as (url, _):
        page = httpx.get(f"{url}/", timeout=10)
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy and "'sha256-" in policy
        assert (
            page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"
        )
        # A cross-site form or fetch can send text/plain without a preflight; the server reads JSON only.
        import json

        sneaky = httpx.post(
            f"{url}/v1/chat/completions",
            content=json.dumps(ask()),
            headers={"Content-Type": "text/plain"},
            timeout=60,
        )
        assert sneaky.status_code == 415


def test_the_api_key_comes_from_a_file_or_the_environment_and_is_never_empty(model, tmp_path, monkeypatch):
    from openflamingo.serve.cli import API_KEY_VARIABLE, read_api_key

    def args(**values):
        import argparse

        return argparse.Namespace(**{"api_key": None, "api_key_file": None, **values})

    (tmp_path / "key").write_text("from-file\n")
    assert read_api_key(args(api_key_file=tmp_path / "key")) == "from-file"
    monkeypatch.setenv(API_KEY_VARIABLE, "from-env")
    assert read_api_key(args()) == "from-env"
    assert read_api_key(args(api_key="given")) == "given"
    for empty in (args(api_key=""), args(api_key="  ")):
        with pytest.raises(ValueError, match="empty"):
            read_api_key(empty)
    monkeypatch.setenv(API_KEY_VARIABLE, "")
    with pytest.raises(ValueError, match=API_KEY_VARIABLE):
        read_api_key(args())
    with pytest.raises(ValueError, match="empty"):
        Settings(settings(model).limits, settings(model).images, model.config.prompt_format, api_key="")


def test_slow_heads_and_bodies_are_cut_at_the_read_timeout(model):
    with running_server(model, settings(model, server={"read_timeout_s": 0.5})) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as head_only:
            head_only.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            started = time.monotonic()
            assert head_only.recv(1024) == b""  # closed by the server
            assert time.monotonic() - started < 5
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
            stalled.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n0123456789"
            )
            assert stalled.recv(1024).startswith(b"HTTP/1.1 408")


def test_connections_past_the_cap_get_a_503(model):
    import uvicorn

    from openflamingo.serve.app import create_app
    from openflamingo.serve.engine import Engine
    from openflamingo.serve.http import server_config

    port = free_port()
    app = create_app(model, Engine(model), settings(model))
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, max_connections=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    try:
        with socket.create_connection(("127.0.0.1", port)), socket.create_connection(("127.0.0.1", port)):
            time.sleep(0.1)
            assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 503
        time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)


def test_the_model_id_defaults_to_the_checkpoint_directory_name(model, tmp_path, monkeypatch):
    from openflamingo.serve import cli

    save_pretrained(model, tmp_path / "my-flamingo", include_backbones=True)
    seen = {}
    monkeypatch.setattr(
        cli, "serve", lambda model, engine, settings, *rest: seen.update(name=settings.limits.model_name)
    )
    from openflamingo.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "my-flamingo")]) == 0
    assert seen["name"] == "my-flamingo"
    assert os.sep not in seen["name"]


def test_every_address_without_a_key_is_warned_about(model, tmp_path, monkeypatch, caplog):
    from openflamingo.cli import main
    from openflamingo.serve import cli

    save_pretrained(model, tmp_path / "m", include_backbones=True)
    monkeypatch.setattr(cli, "serve", lambda *args: None)
    with caplog.at_level("WARNING", logger="openflamingo.serve"):
        assert main(["serve", "--checkpoint", str(tmp_path / "m"), "--host", "0.0.0.0"]) == 0
    assert any("without an API key" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="openflamingo.serve"):
        assert (
            main(["serve", "--checkpoint", str(tmp_path / "m"), "--host", "0.0.0.0", "--api-key", "k"]) == 0
        )
    assert not any("without an API key" in r.getMessage() for r in caplog.records)
