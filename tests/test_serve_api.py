"""`openflamingo serve` through the real `openai` client: plain and streamed answers about an image, n > 1, stop
sequences, the answer equal to Flamingo.generate's; /v1/score; the CLI's startup and its missing-checkpoint error."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from helpers.serve import generate
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
from openflamingo.cli import main

openai = pytest.importorskip("openai", reason="the serving tests use the openai client (pip install openai)")

QUESTION = [{"role": "user", "content": [image_part(), {"type": "text", "text": "what color is the shape?"}]}]


@pytest.fixture(scope="module")
def model(tokenizer_dir):
    return tiny_model(tokenizer_dir)


@pytest.fixture(scope="module")
def server(model):
    with running_server(model, settings(model)) as (url, engine):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def test_answer_about_an_image_equals_flamingo_generate(client, model):
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
    (choice,) = response.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == generate(model, QUESTION, 8)
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 0 and 0 < response.usage.completion_tokens <= 8
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streamed_answer_arrives_in_chunks_and_equals_the_plain_one(client):
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_n_answers_sampled_with_a_seed_are_reproducible(client):
    ask = dict(model=MODEL, messages=QUESTION, max_tokens=6, temperature=1.0, n=3, seed=42)
    first, again = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1
    other = client.chat.completions.create(**{**ask, "seed": 43})
    assert [c.message.content for c in other.choices] != texts


def test_stop_sequence_ends_the_answer_before_it(client):
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
    text = plain.choices[0].message.content
    stop = text[3:5]
    assert len(stop) == 2, text
    stopped = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=8, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].message.content == text[: text.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_score_ranks_candidate_answers(server):
    body = {"model": MODEL, "messages": QUESTION, "candidates": ["red", "a blue square", "green"]}
    response = httpx.post(f"{server}/v1/score", json=body, timeout=60)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [d["candidate"] for d in data] == body["candidates"]
    assert all(d["logprob"] < 0 and d["tokens"] >= 1 for d in data)
    assert data[1]["mean_logprob"] == pytest.approx(data[1]["logprob"] / data[1]["tokens"])


def test_serve_without_a_checkpoint_says_to_run_make_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["serve"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "make demo" in error


def test_serve_command_starts_and_prints_its_urls(model, tmp_path, monkeypatch, capsys):
    """The command's own code path (load, settings, app, uvicorn) on a saved checkpoint; uvicorn.Server.run is
    replaced by the same server run on a thread, so that the test can stop it."""
    import uvicorn

    save_pretrained(model, tmp_path / "model", include_backbones=True)
    port = free_port()
    answers = []

    serve_forever = uvicorn.Server.run

    def run_and_ask(server):
        host, port = server.config.host, server.config.port
        thread = threading.Thread(target=serve_forever, args=(server,), daemon=True)
        thread.start()
        try:
            while not server.started and thread.is_alive():
                time.sleep(0.01)
            ask = {"model": "tiny", "messages": QUESTION, "max_tokens": 3}
            answers.append(httpx.post(f"http://{host}:{port}/v1/chat/completions", json=ask, timeout=60))
        finally:
            server.should_exit = True
            thread.join(timeout=30)

    monkeypatch.setattr(uvicorn.Server, "run", run_and_ask)
    assert (
        main(["serve", "--checkpoint", str(tmp_path / "model"), "--port", str(port), "--model-name", "tiny"])
        == 0
    )
    out = capsys.readouterr().out
    assert f"http://127.0.0.1:{port}/ " in out and f"http://127.0.0.1:{port}/v1" in out, out
    assert answers[0].status_code == 200, answers[0].text
