"""Conversation data: prompt formats, answer-only labels, the LLaVA converter."""

import json

import pytest
from helpers.data import CHATML, _png
from transformers import AutoTokenizer

from openflamingo.data.convert import convert
from openflamingo.data.samples import BadSample, Conversation, ImageItem, Turn, sample_from_members
from openflamingo.data.shards import read_shard
from openflamingo.data.text import IGNORE_INDEX, FormatConfig, SampleFormatter
from openflamingo.model.prompt_format import Message, PromptFormat

TWO_TURNS = [
    Message("user", "<image>What colour is it?"),
    Message("assistant", "It is red."),
    Message("user", "<image>\nAnd this one?"),
    Message("assistant", "Blue."),
]


@pytest.fixture()
def chat_tokenizer(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.eos_token = "<|im_end|>"
    return tokenizer


def test_flamingo_format_renders_images_first_and_closes_each_answer():
    rendered = PromptFormat(template="Question: {question} Short answer: {answer}").render(TWO_TURNS)
    assert rendered.text == (
        "<image>Question: What colour is it? Short answer: It is red.<|endofchunk|>"
        "<image>Question: And this one? Short answer: Blue.<|endofchunk|>"
    )
    assert [rendered.text[a:b] for a, b in rendered.answer_spans] == [
        " It is red.<|endofchunk|>",
        " Blue.<|endofchunk|>",
    ]
    prompt = PromptFormat().render(TWO_TURNS[:3], add_generation_prompt=True)
    assert prompt.text.endswith("<image>Question:And this one? Short answer:")


def test_chat_format_renders_two_turns_two_images_as_written_by_hand(chat_tokenizer):
    fmt = PromptFormat(kind="chat", system="Answer briefly.")
    rendered = fmt.render(TWO_TURNS, chat_tokenizer)
    assert rendered.text == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\n<image>What colour is it?<|im_end|>\n"
        "<|im_start|>assistant\nIt is red.<|im_end|>\n"
        "<|im_start|>user\n<image>\nAnd this one?<|im_end|>\n"
        "<|im_start|>assistant\nBlue.<|im_end|>\n"
    )
    assert [rendered.text[a:b] for a, b in rendered.answer_spans] == [
        "It is red.<|im_end|>\n",
        "Blue.<|im_end|>\n",
    ]
    assert fmt.render(TWO_TURNS[:3], chat_tokenizer, True).text.endswith(
        "And this one?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert fmt.stop_strings(chat_tokenizer) == ["<|im_end|>", "<|endofchunk|>"]


def test_bad_formats_and_conversations_are_clear_errors(tokenizer_dir):
    with pytest.raises(ValueError, match="must use {question} and {answer} once each"):
        PromptFormat(template="Q: {question}")
    with pytest.raises(ValueError, match="kind must be one of"):
        PromptFormat(kind="alpaca")
    with pytest.raises(ValueError, match="last message must be the user's"):
        PromptFormat().render(TWO_TURNS, add_generation_prompt=True)
    with pytest.raises(ValueError, match="message 1 \\(assistant\\) has an image"):
        PromptFormat().render([Message("user", "hi"), Message("assistant", "<image>")])
    with pytest.raises(ValueError, match="has none"):
        PromptFormat(kind="chat").render(TWO_TURNS, AutoTokenizer.from_pretrained(str(tokenizer_dir)))


def _labelled(formatter, conversation):
    tokens = formatter.format_sample(conversation)
    tokenizer = formatter.tokenizer
    trained = [i for i, label in enumerate(tokens.labels) if label != IGNORE_INDEX]
    assert all(tokens.labels[i] == tokens.input_ids[i] for i in trained)
    return tokens, tokenizer.decode([tokens.input_ids[i] for i in trained])


CONVERSATION = Conversation(
    "c",
    [Turn(m.role, m.text) for m in TWO_TURNS],
    [ImageItem(b"x", "png"), ImageItem(b"y", "png")],
)


def test_answer_only_labels_in_the_flamingo_format(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    fmt = PromptFormat(template="Question: {question} Short answer: {answer}")
    formatter = SampleFormatter(tokenizer, FormatConfig(max_tokens=256, prompt_format=fmt))
    tokens, trained = _labelled(formatter, CONVERSATION)
    assert tokens.num_images == 2
    assert trained == " It is red.<|endofchunk|> Blue.<|endofchunk|></s>"
    lead = len(formatter.leading_ids)
    assert tokens.input_ids[:lead] == formatter.leading_ids
    assert tokenizer.decode(tokens.input_ids[lead:]) == fmt.render(TWO_TURNS).text + "</s>"
    # cut inside the second question: its image stays, nothing of the second answer is trained
    short = SampleFormatter(
        tokenizer,
        FormatConfig(max_tokens=tokens.input_ids.index(formatter.media_id, 2) + 3, prompt_format=fmt),
    )
    cut, trained = _labelled(short, CONVERSATION)
    assert cut.truncated and cut.num_images == 2 and trained == " It is red.<|endofchunk|>"


def test_answer_only_labels_in_the_chat_format(chat_tokenizer):
    formatter = SampleFormatter(
        chat_tokenizer, FormatConfig(max_tokens=256, prompt_format=PromptFormat(kind="chat"))
    )
    tokens, trained = _labelled(formatter, CONVERSATION)
    assert trained == "It is red.<|im_end|>\nBlue.<|im_end|>\n"
    assert tokens.input_ids[0] == chat_tokenizer.convert_tokens_to_ids(
        "<|im_start|>"
    )  # the template's own start
    assert tokens.input_ids.count(formatter.media_id) == tokens.num_images == 2


def test_llava_records_convert_and_bad_ones_are_counted_by_reason(tmp_path):
    (tmp_path / "img").mkdir()
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        (tmp_path / "img" / name).write_bytes(_png(colour))
    human, gpt = "human", "gpt"
    records = [
        {
            "id": "one",
            "image": "a.png",
            "conversations": [
                {"from": human, "value": "<image>\nWhat colour?"},
                {"from": gpt, "value": "Red."},
                {"from": human, "value": "Sure?"},
                {"from": gpt, "value": "Yes."},
            ],
        },
        {
            "id": "two",
            "images": ["a.png", "b.png"],
            "conversations": [
                {"from": human, "value": "Compare <image> and <image>."},
                {"from": gpt, "value": "Red, blue."},
            ],
        },
        {
            "id": "no-marker",
            "image": "b.png",
            "conversations": [{"from": human, "value": "What is it?"}, {"from": gpt, "value": "A square."}],
        },
        {"id": "no-answer", "image": "a.png", "conversations": [{"from": human, "value": "<image>Hi"}]},
        {
            "id": "markers",
            "image": "a.png",
            "conversations": [{"from": human, "value": "<image><image>Two?"}, {"from": gpt, "value": "No."}],
        },
        {
            "id": "missing",
            "image": "gone.png",
            "conversations": [{"from": human, "value": "<image>?"}, {"from": gpt, "value": "?"}],
        },
        {
            "id": "role",
            "image": "a.png",
            "conversations": [{"from": "robot", "value": "<image>?"}, {"from": gpt, "value": "?"}],
        },
        {
            "id": "text-only",
            "conversations": [{"from": human, "value": "Hi"}, {"from": gpt, "value": "Hello."}],
        },
    ]
    source = tmp_path / "llava.json"
    source.write_text(json.dumps(records))
    report = convert("llava", [str(source)], tmp_path / "shards", images=tmp_path / "img")
    assert report.samples == 3
    assert report.skipped == {
        "no_assistant_turn": 1,
        "image_count_mismatch": 1,
        "missing_image": 1,
        "bad_role": 1,
        "no_image": 1,
    }
    samples = [
        sample_from_members(raw.key, raw.members) for shard in report.shards for raw in read_shard(shard)
    ]
    assert [s.metadata["source_key"] for s in samples] == ["one", "two", "no-marker"]
    assert [t.role for t in samples[0].turns] == ["user", "assistant", "user", "assistant"]
    assert samples[1].images[1].data == _png("blue")
    assert (
        samples[2].turns[0].text == "<image>\nWhat is it?"
    )  # LLaVA's rule: images before the first question


def test_a_conversation_member_must_place_every_image():
    members = Conversation(
        "k", [Turn("user", "<image>x"), Turn("assistant", "y")], [ImageItem(_png("red"), "png")]
    ).to_members()
    assert isinstance(sample_from_members("k", members), Conversation)
    members["1.png"] = _png("blue")
    with pytest.raises(BadSample, match="no message places"):
        sample_from_members("k", members)


def test_eval_prompts_of_a_chat_model_are_chat_turns(chat_tokenizer):
    from pathlib import Path

    from openflamingo.eval.datasets import Example
    from openflamingo.eval.prompts import build_prompt
    from openflamingo.eval.tasks import TaskPrompt

    def example(i, question, answer):
        return Example(i, [(Path(f"{i}.jpg"),)], {"question": question}, answer)

    vqa = TaskPrompt("<image>Question:{question} Short answer:{answer}", "\n")
    chat = (PromptFormat(kind="chat"), chat_tokenizer)
    demo, query = example(1, "What colour?", "red"), example(2, "What shape?", "")
    prompt = build_prompt(vqa, [demo], query, shots=1, dialogue=chat)
    assert prompt.text == (
        "<|im_start|>user\n<image>Question:What colour? Short answer:<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\n<image>Question:What shape? Short answer:<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt.images == [Path("1.jpg"), Path("2.jpg")]
    zero_shot = build_prompt(vqa, [demo], query, shots=0, dialogue=chat)  # text-only demonstrations
    assert zero_shot.images == [Path("2.jpg")] and zero_shot.text.count("<image>") == 1
