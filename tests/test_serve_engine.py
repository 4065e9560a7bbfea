"""The serving engine: answers decoded in a shared batch equal the same requests served alone, and greedy answers
equal Flamingo.generate's."""

from __future__ import annotations

import time

import pytest
import torch
from helpers.serve import conversation, job
from serving import (
    CharTokenizer,
    one_thread,  # noqa: F401 (an autouse fixture: tiny models run on one thread)
    tiny_model,
)

from openflamingo.model.inputs import prepare_inputs
from openflamingo.serve.completion import Completion
from openflamingo.serve.engine import Delta, Engine, ScoreJob
from openflamingo.serve.images import ImagePolicy
from openflamingo.serve.prepare import prepare_prompt
from openflamingo.serve.protocol import Limits, parse_messages


@pytest.fixture(scope="module")
def model(tokenizer_dir):
    return tiny_model(tokenizer_dir)


REQUESTS = [  # (images, words, turns, max_tokens, n, temperature, seed)
    (1, 1, 1, 12, 1, 0.0, None),
    (3, 4, 1, 5, 1, 0.0, None),  # leaves the batch early
    (0, 2, 1, 9, 1, 0.0, None),  # text only: the batch without images
    (2, 9, 2, 10, 2, 1.0, 7),  # sampled, two answers, a few-shot conversation
    (1, 0, 1, 11, 1, 0.8, 123),
    (0, 6, 1, 7, 3, 1.2, 5),
]


def test_batched_answers_equal_answers_served_alone(model):
    engine = Engine(model, max_batch_size=8, batch_wait_s=0.2)
    engine.start()
    try:
        alone = []
        for images, words, turns, max_tokens, n, temperature, seed in REQUESTS:
            single, answers = job(model, conversation(images, words, turns), max_tokens, n, temperature, seed)
            engine.submit(single)
            assert answers.done.wait(60)
            alone.append(answers)
        steps_alone, prefills_alone = engine.steps, engine.prefills

        jobs = [job(model, conversation(i, w, t), m, n, temp, s) for i, w, t, m, n, temp, s in REQUESTS]
        for single, _ in jobs[:-1]:  # together within the batch wait: one batch (two: with / without images)
            engine.submit(single)
        assert jobs[0][1].first.wait(60)
        engine.submit(jobs[-1][0])  # a late arrival joins the running batch (left-padded to its length)
        for _, answers in jobs:
            assert answers.done.wait(60)
    finally:
        engine.stop()
    assert engine.steps - steps_alone < steps_alone / 2  # decoded together, not one after another
    assert engine.prefills - prefills_alone == 3  # with images, without, the late arrival
    for (_, together), single, request in zip(jobs, alone, REQUESTS, strict=True):
        assert together.texts == single.texts, request
        assert together.reasons == single.reasons and together.tokens == single.tokens, request
    assert alone[1].reasons == ["length"] and alone[1].tokens == [5]
    assert len(set(alone[3].texts)) == 2  # the two sampled answers differ


def test_greedy_answer_equals_flamingo_generate(model):
    messages = conversation(2, 3, turns=2)
    single, answers = job(model, messages, max_tokens=10)
    engine = Engine(model)
    engine.start()
    try:
        engine.submit(single)
        assert answers.done.wait(60)
    finally:
        engine.stop()
    text = model.config.prompt_format.render(
        parse_messages(messages, Limits("m")).messages, add_generation_prompt=True
    ).text
    images = prepare_prompt(
        model, model.config.prompt_format, parse_messages(messages, Limits("m")), ImagePolicy()
    ).images
    inputs = prepare_inputs(model, [text], [[]])
    output = model.generate(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        images=images,
        max_new_tokens=10,
        do_sample=False,
    )
    expected = model.tokenizer.decode(
        output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    ).lstrip()
    assert answers.texts == [expected]
    assert answers.tokens == [output.shape[1] - inputs["input_ids"].shape[1]]


def test_score_job_ranks_candidates_with_the_prompt_computed_once(model):
    from openflamingo.eval.inference import rank_classes_from_tensors

    prompt = prepare_prompt(
        model, model.config.prompt_format, parse_messages(conversation(1, 2), Limits("m")), ImagePolicy()
    )
    candidates = [[40, 41], [50], [60, 61, 62]]
    engine = Engine(model)
    engine.start()
    try:
        scoring = ScoreJob(prompt.input_ids, prompt.images, candidates)
        engine.submit(scoring)
        scores = scoring.result.result(60)
    finally:
        engine.stop()
    ids = torch.tensor([prompt.input_ids])
    expected = rank_classes_from_tensors(
        model, ids, torch.ones_like(ids), prompt.images, candidates, length_normalize=False
    )
    torch.testing.assert_close(torch.tensor(scores), expected[0])


def test_stop_sequences_end_the_answer_and_are_never_streamed():
    text = "the cat sat. END here"
    completion = Completion(CharTokenizer(text), ["END", "xyz"], stop_token_ids={-1}, max_tokens=100)
    streamed = [completion.add(i) for i in range(len(text)) if not completion.finished]
    assert "".join(streamed) == "the cat sat. "
    assert completion.finish_reason == "stop"
    assert "E" not in "".join(streamed[:-1])  # the held-back "E" was never sent before the stop was certain


def test_broken_characters_are_held_back_only_while_they_may_still_complete(tokenizer_dir):
    """A multi-byte character split over tokens streams once whole; bytes that can never be a character stream as
    they come (a random model makes many), instead of holding back the rest of the answer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    euro = tokenizer("€", add_special_tokens=False)["input_ids"]  # three byte tokens
    # The byte-level BPE's symbols of the bytes 0x80 and 0x81 (GPT-2's byte-to-unicode table): lone continuation bytes.
    invalid = tokenizer.convert_tokens_to_ids([chr(290), chr(291)])
    completion = Completion(tokenizer, [], stop_token_ids=set(), max_tokens=100)
    assert len(euro) == 3 and [completion.add(t) for t in euro] == ["", "", "€"]
    streamed = [completion.add(t) for t in invalid + tokenizer("ok", add_special_tokens=False)["input_ids"]]
    assert streamed[0] == "" and streamed[1] == "\ufffd" and "".join(streamed) == "\ufffd\ufffdok"


def test_long_prompts_are_prefilled_in_chunks_with_the_same_answers(model):
    requests = [REQUESTS[0], REQUESTS[2], REQUESTS[3], (2, 30, 2, 8, 1, 0.0, None)]
    served = {}
    for chunk in (512, 8):
        engine = Engine(model, prefill_chunk=chunk)
        engine.start()
        try:
            served[chunk] = []
            for images, words, turns, max_tokens, n, temperature, seed in requests:
                single, answers = job(
                    model, conversation(images, words, turns), max_tokens, n, temperature, seed
                )
                assert len(single.input_ids) > 8
                engine.submit(single)
                assert answers.done.wait(60)
                served[chunk].append((answers.texts, answers.reasons))
        finally:
            engine.stop()
        served[f"{chunk} prefills"] = engine.prefills
    assert served[8] == served[512]
    assert served["8 prefills"] > 3 * served["512 prefills"]


def test_a_long_prefill_takes_its_share_of_time_between_the_running_answers_steps(model):
    """A long prompt is prefilled a chunk at a time, with at most `bulk_share` of the engine's time while another
    answer is being decoded: that answer finishes first, having waited for few chunks."""
    engine = Engine(model, prefill_chunk=4, bulk_share=0.25)
    engine.stop_token_ids = set()  # the short answer runs all its tokens
    events = []

    def recorder(name):
        return lambda event: (
            None if isinstance(event, Delta) else events.append((name, engine.prefills, engine.steps))
        )

    short, _ = job(model, conversation(1, 1), max_tokens=30)
    long, _ = job(model, conversation(1, 40, turns=2), max_tokens=1)
    short.emit, long.emit = recorder("short"), recorder("long")
    assert len(long.input_ids) > 40 * 4  # over 40 chunks
    # Every forward costs about the same (a sleep dominates), so the share of time is a share of forwards.
    slow = model.language_model.register_forward_pre_hook(lambda *_: time.sleep(0.01))
    engine.start()
    try:
        engine.submit(short)
        deadline = time.monotonic() + 60
        while engine.steps == 0 and time.monotonic() < deadline:  # the short answer is decoding
            time.sleep(0.001)
        prefills, steps = engine.prefills, engine.steps
        engine.submit(long)
        while len(events) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
        slow.remove()
    assert [name for name, _, _ in events] == ["short", "long"]
    chunks, decode_steps = events[0][1] - prefills, events[0][2] - steps
    assert 0 < chunks <= decode_steps / 2, (chunks, decode_steps)
