"""No single request can stall or crash the server: work is bounded before it starts, every malformed input is a 4xx,
typed control tokens are text, a full line is a 429, and requests whose client left or whose deadline passed free
their batch rows. Each class is checked with a good request sent alongside, answered without waiting for the bad one."""

from __future__ import annotations

import io
import json
import threading
import time

import httpx
import pytest
import torch
from PIL import Image
from serving import (
    MODEL,
    CharTokenizer,
    data_url,
    image_part,
    one_thread,  # noqa: F401 (an autouse fixture: tiny models run on one thread)
    running_server,
    settings,
    tiny_model,
)

from openflamingo.serve.completion import Completion
from openflamingo.serve.engine import Delta, GenerationJob
from openflamingo.serve.images import ImagePolicy
from openflamingo.serve.prepare import prepare_prompt
from openflamingo.serve.protocol import Limits, parse_messages
from openflamingo.serve.sampling import Sampling

GOOD = {
    "model": MODEL,
    "max_tokens": 3,
    "temperature": 0,
    "messages": [{"role": "user", "content": [image_part(), {"type": "text", "text": "what is it?"}]}],
}


@pytest.fixture(scope="module")
def model(tokenizer_dir):
    return tiny_model(tokenizer_dir)


@pytest.fixture(scope="module")
def server(model):
    with running_server(model, settings(model, max_tokens=64, max_score_tokens=200)) as served:
        yield served


def ask(messages, **fields) -> dict:
    return {"model": MODEL, "messages": messages, "max_tokens": 2, **fields}


def user(text) -> list[dict]:
    return [{"role": "user", "content": text}]


def post(url: str, body, path: str = "/v1/chat/completions", **options) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        headers = {"Content-Type": "application/json", **options.pop("headers", {})}
        return httpx.post(f"{url}{path}", content=body, headers=headers, timeout=60, **options)
    return httpx.post(f"{url}{path}", json=body, timeout=60, **options)


def assert_refused(response: httpx.Response, status: int = 400, code: str | None = None, param=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def with_good_request(url: str, engine, bad) -> httpx.Response:
    """Send `bad()` and a good request at the same time; the good one is answered, in few engine steps."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(bad=bad()))
    steps = engine.steps + engine.score_steps
    thread.start()
    good = post(url, GOOD)
    assert good.status_code == 200, good.text
    assert engine.steps + engine.score_steps - steps < 200
    thread.join(60)
    return result["bad"]


# ----- 1. cost bounded before work --------------------------------------------------------------------------------
def test_a_huge_stop_sequence_is_refused_and_a_long_one_is_cheap(server):
    url, engine = server
    bad = with_good_request(url, engine, lambda: post(url, ask(user("hi"), stop="x" * 100_000)))
    assert "--max-stop-chars" in assert_refused(bad, param="stop", code="invalid_value")["message"]
    # At the cap, a stop that almost matches at every token costs little per token.
    completion = Completion(CharTokenizer("a" * 600), ["a" * 255 + "b"], stop_token_ids=set(), max_tokens=600)
    start = time.perf_counter()
    streamed = "".join(completion.add(i) for i in range(600))
    assert time.perf_counter() - start < 2 and streamed == "a" * 600 and completion.finish_reason == "length"


def test_text_that_cannot_fit_the_context_is_refused_before_tokenizing(server, model, monkeypatch):
    url, engine = server
    calls = []
    tokenizer_call = type(model.tokenizer).__call__
    monkeypatch.setattr(
        type(model.tokenizer), "__call__", lambda *a, **k: calls.append(1) or tokenizer_call(*a, **k)
    )
    bad = with_good_request(url, engine, lambda: post(url, ask(user("the red cat " * 700_000))))
    error = assert_refused(bad, code="context_length_exceeded", param="messages")
    assert "characters" in error["message"]
    assert len(calls) == 1  # the good request's prompt only


def test_prompt_rendering_is_linear_in_the_turns(tokenizer_dir, monkeypatch):
    """A chat prompt of 1,001 turns renders the template once (not once per assistant turn)."""
    from transformers import AutoTokenizer

    from openflamingo.model.prompt_format import Message, PromptFormat

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m.role }}: {{ m.content }}</s>{% endfor %}"
    renders = []
    apply = type(tokenizer).apply_chat_template
    monkeypatch.setattr(
        type(tokenizer), "apply_chat_template", lambda *a, **k: renders.append(1) or apply(*a, **k)
    )
    turns = [Message("user" if i % 2 == 0 else "assistant", f"turn {i}") for i in range(1001)]
    text = PromptFormat(kind="chat").render(turns, tokenizer, add_generation_prompt=True).text
    assert len(renders) == 1 and text.count("</s>") == 1001


def test_score_work_is_bounded_by_the_context_and_the_token_limit(server):
    url, engine = server
    question = user("what color?")
    longer_than_context = post(
        url, {"model": MODEL, "messages": question, "candidates": ["red " * 1500]}, "/v1/score"
    )
    assert_refused(longer_than_context, code="context_length_exceeded", param="candidates[0]")
    bad = with_good_request(
        url,
        engine,
        lambda: post(
            url, {"model": MODEL, "messages": question, "candidates": ["red cat"] * 150}, "/v1/score"
        ),
    )
    assert "--max-score-tokens" in assert_refused(bad, code="too_many_tokens")["message"]
    many = post(url, {"model": MODEL, "messages": question, "candidates": ["a"] * 10_001}, "/v1/score")
    assert "--max-candidates" in assert_refused(many, param="candidates")["message"]


def test_a_large_score_request_runs_in_steps_between_decode_steps(model):
    """Many candidates are scored a call at a time; an answer sent meanwhile does not wait for them all."""
    from openflamingo.eval.inference import rank_classes_from_tensors
    from openflamingo.serve.engine import Engine
    from openflamingo.serve.scoring import ScoreJob

    content = [image_part(), {"type": "text", "text": "what?"}]
    conversation = parse_messages([{"role": "user", "content": content}], Limits("m"))
    prompt = prepare_prompt(model, model.config.prompt_format, conversation, ImagePolicy())
    candidates = [[40 + i % 50, 41, 42 + i % 7][: 1 + i % 3] for i in range(300)]
    engine = Engine(model, score_positions=16)
    engine.start()
    try:
        scoring = ScoreJob(prompt.input_ids, prompt.images, candidates)
        engine.submit(scoring)
        done = threading.Event()
        answer = GenerationJob(
            prompt.input_ids,
            prompt.images,
            4,
            [],
            [Sampling(0.0, 1.0)],
            lambda e: None if isinstance(e, Delta) else done.set(),
        )
        engine.submit(answer)
        assert done.wait(60)
        steps_when_answered = engine.score_steps
        scores = scoring.result.result(60)
    finally:
        engine.stop()
    assert steps_when_answered < engine.score_steps  # the answer finished while scoring was still going on
    ids = torch.tensor([prompt.input_ids])
    expected = rank_classes_from_tensors(
        model, ids, torch.ones_like(ids), prompt.images, candidates, length_normalize=False
    )
    assert scores == pytest.approx(expected[0].tolist(), abs=1e-4)


def image_bytes(size, format="PNG", frames: int = 1) -> bytes:
    buffer = io.BytesIO()
    first, *rest = [Image.new("RGB", size, (i % 256, 40, 90)) for i in range(frames)]
    first.save(buffer, format=format, save_all=frames > 1, append_images=rest)
    return buffer.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\nshowpage\n"
COSTLY_IMAGES = {  # name: (bytes, status, code); all sent as data:image/png URLs
    "4000x1 PNG": (lambda: image_bytes((4000, 1)), 400, "image_aspect_ratio"),
    "EPS file": (lambda: EPS, 400, "invalid_image"),
    "GIF of 1,000 frames": (lambda: image_bytes((64, 64), "GIF", frames=1000), 200, None),
    "6000x6000 PNG": (lambda: image_bytes((6000, 6000)), 200, None),
}


@pytest.mark.parametrize("name", sorted(COSTLY_IMAGES))
def test_costly_images_are_refused_or_cheap_and_others_are_answered_meanwhile(server, name, monkeypatch):
    from PIL import EpsImagePlugin

    url, engine = server
    data, status, code = COSTLY_IMAGES[name]
    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(1))
    content = [
        {"type": "image_url", "image_url": {"url": data_url(data())}},
        {"type": "text", "text": "what?"},
    ]
    started = time.monotonic()
    answer = with_good_request(url, engine, lambda: post(url, ask([{"role": "user", "content": content}])))
    assert answer.status_code == status, answer.text
    if code is not None:
        assert_refused(answer, code=code, param="messages[0].content[0].image_url")
    assert time.monotonic() - started < 20 and not opened  # the Ghostscript plugin never saw the EPS


# ----- 2. every malformed input is a 4xx -----------------------------------------------------------------------
MALFORMED = {  # name: (raw body, param)
    "deep array": ('{"model": "tiny-flamingo", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}", None),
    "deep object": ('{"model": "tiny-flamingo", "user": ' + '{"a": ' * 50 + "1" + "}" * 50 + "}", None),
    "5000-digit seed": (json.dumps(ask(user("hi")))[:-1] + ', "seed": ' + "9" * 5000 + "}", None),
    "seed past 64 bits": (json.dumps(ask(user("hi"), seed=2**64)), "seed"),
    "huge temperature": (json.dumps(ask(user("hi"), temperature=10**400)), "temperature"),
    "temperature NaN": (json.dumps(ask(user("hi")))[:-1] + ', "temperature": NaN}', None),
    "top_p Infinity": (json.dumps(ask(user("hi")))[:-1] + ', "top_p": Infinity}', None),
    "temperature 1e400": (json.dumps(ask(user("hi")))[:-1] + ', "temperature": 1e400}', "temperature"),
    "lone surrogate in text": (json.dumps(ask(user("hi \ud800 there"))), "messages[0].content"),
    "lone surrogate in a field name": (json.dumps(ask(user("hi")))[:-1] + ', "\\udc80x": 1}', "(a key)"),
    "name not a string": (
        json.dumps({**ask(user("hi")), "messages": [{"role": "user", "content": "a", "name": 3}]}),
        "messages[0].name",
    ),
    "role a list": (json.dumps(ask([{"role": ["user"], "content": "hi"}])), "messages[0].role"),
    "not UTF-8": (b'{"model": "\xff"}', None),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_input_is_a_400_never_a_500(server, name):
    url, engine = server
    body, param = MALFORMED[name]
    error = assert_refused(with_good_request(url, engine, lambda: post(url, body)))
    if param is not None:
        assert error["param"] == param, error
    assert "Error" not in error["message"] and "Traceback" not in error["message"]


def test_a_near_zero_temperature_is_greedy_and_fails_no_other_request(server):
    url, _ = server
    greedy = post(url, {**GOOD, "max_tokens": 6})
    tiny = post(url, {**GOOD, "max_tokens": 6, "temperature": 1e-300})
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"] == greedy.json()["choices"]


def test_an_internal_error_is_a_generic_500_with_a_request_id(server, monkeypatch, caplog):
    import openflamingo.serve.app as app

    url, _ = server

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(app, "prepare_prompt", broken)
    with caplog.at_level("ERROR", logger="openflamingo.serve"):
        response = post(url, GOOD)
    error = assert_refused(response, status=500)
    assert error["type"] == "server_error" and "secret" not in error["message"]
    request_id = error["message"].split()[-1]
    assert any(
        request_id in r.getMessage() and "secret internal detail" in r.exc_text for r in caplog.records
    )


# ----- 3. text is text --------------------------------------------------------------------------------------------
def test_control_tokens_typed_in_text_are_tokenized_as_text(model):
    tokenizer = model.tokenizer
    typed = "close</s>and <s>open"
    conversation = parse_messages(user(typed), Limits("m"))
    prompt = prepare_prompt(model, model.config.prompt_format, conversation, ImagePolicy())
    specials = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    assert not specials & set(prompt.input_ids[1:])  # the format's own BOS (if any) stays
    assert typed in tokenizer.decode(prompt.input_ids)
    # The same text typed in a chat prompt: the template's </s> are control tokens, the typed one is text.
    from openflamingo.model.prompt_format import PromptFormat

    tokenizer.chat_template = "{% for m in messages %}<s>{{ m.role }}: {{ m.content }}</s>{% endfor %}"
    try:
        chat = prepare_prompt(model, PromptFormat(kind="chat"), conversation, ImagePolicy())
    finally:
        tokenizer.chat_template = None
    assert (
        chat.input_ids.count(tokenizer.eos_token_id) == 1
        and chat.input_ids.count(tokenizer.bos_token_id) == 1
    )


def test_control_tokens_in_score_candidates_are_text(server, model):
    url, _ = server
    response = post(url, {"model": MODEL, "messages": user("hi"), "candidates": ["</s>", "red"]}, "/v1/score")
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["tokens"] == len(
        model.tokenizer("</s>", split_special_tokens=True)["input_ids"]
    )


def test_requests_prepared_on_several_threads_at_once_all_tokenize(model):
    # A fast tokenizer's Rust object refuses a second call while one runs ("RuntimeError: Already borrowed"):
    # requests prepare on worker threads, several at a time.
    from concurrent.futures import ThreadPoolExecutor

    from openflamingo.serve.prepare import candidate_ids

    conversation = parse_messages(user("close</s>and <s>open " * 40), Limits("m"))
    expected = prepare_prompt(model, model.config.prompt_format, conversation, ImagePolicy()).input_ids

    def prepare_and_score(_):
        prompt = prepare_prompt(model, model.config.prompt_format, conversation, ImagePolicy())
        candidate_ids(model, model.config.prompt_format, ["red </s>", "blue"] * 20)
        return prompt.input_ids

    with ThreadPoolExecutor(8) as pool:
        assert all(ids == expected for ids in pool.map(prepare_and_score, range(400)))


# ----- fuzzing the request schema ---------------------------------------------------------------------------------
def test_fuzzed_requests_get_no_500_and_leave_the_server_healthy(server):
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hypothesis_settings
    from hypothesis import strategies as st

    url, _ = server
    text = st.text(alphabet=st.characters(codec=None), max_size=30) | st.sampled_from(
        ["</s>", "<s>", "<image>", "<|endofchunk|>", "\ud800", "x" * 300]
    )
    numbers = st.integers() | st.floats(allow_nan=False) | st.sampled_from([1e-300, -0.0, 2**63, 10**30])
    leaf = st.none() | st.booleans() | numbers | text
    values = st.recursive(
        leaf,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
        max_leaves=8,
    )
    fields = st.sampled_from(
        [
            "messages",
            "max_tokens",
            "temperature",
            "top_p",
            "n",
            "stop",
            "seed",
            "stream",
            "stream_options",
            "model",
            "candidates",
            "logprobs",
            "tools",
            "x",
        ]
    )
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool"]) | values, "content": values | text}
    )

    @hypothesis_settings(
        max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(
        fields=st.dictionaries(fields, values, max_size=4), messages=st.lists(message, min_size=1, max_size=3)
    )
    def check(fields, messages):
        body = {"model": MODEL, "messages": messages, "max_tokens": 2, **fields}
        raw = json.dumps(body, ensure_ascii=True)  # ensure_ascii: lone surrogates travel as \\ud800 escapes
        for path in ("/v1/chat/completions", "/v1/score"):
            response = post(url, raw, path)
            assert response.status_code < 500, (body, response.text)

    check()
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    assert post(url, GOOD).status_code == 200
