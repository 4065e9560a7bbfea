"""Every path that feeds the model moves its tensors to the model's device, and a training step asks the device for
nothing. CI has no GPU, so the model goes to the `meta` device instead: any tensor left on the CPU is caught where
it reaches the model, just as a CUDA run would fail on it."""

from __future__ import annotations

import pytest
import torch
from helpers.eval import VQA_FILES, cli
from helpers.model import META, ReachedModel, assert_on, tensors, tiny_model
from helpers.train import config_of, tiny_run

import openflamingo.cli as main_cli
import openflamingo.model.checkpoint as checkpoint_module
from openflamingo.model.inputs import to_device
from openflamingo.train import distributed, train
from openflamingo.train.data import SyntheticLoader
from openflamingo.train.prefetch import DevicePrefetcher


def install_device_checks(model, device: torch.device, input_check: bool = True) -> None:
    """At every entry into the model (its forward, vision encoder, language model and, with `input_check`, its input
    check): assert the inputs are on `device`, then stop with ReachedModel. (Training checks inputs on purpose on
    the CPU copy of a batch, before it moves.)"""
    for name, module in [("forward", model), ("vision", model.vision_encoder), ("lm", model.language_model)]:
        module.register_forward_pre_hook(
            lambda m, args, kwargs, name=name: assert_on(device, name, args, kwargs), with_kwargs=True
        )
    if input_check:
        model.check_inputs = lambda *args, **kwargs: assert_on(device, "check_inputs", args, kwargs)


def test_nested_micro_steps_move_to_the_device():
    step = {"pairs": {"input_ids": torch.zeros(2, 3, dtype=torch.long), "nested": [torch.ones(1)]}, "n": 3}
    moved = to_device(step, META)
    assert [t.device for t in tensors(moved)] == [META, META] and moved["n"] == 3


@pytest.mark.parametrize("mfu", [True, False], ids=["flop-count", "training-step"])
def test_training_sends_every_batch_to_the_model_device(tokenizer_dir, tmp_path, monkeypatch, mfu):
    """The first CUDA run crashed here: micro-steps are {dataset: batch} and stayed on the CPU."""
    monkeypatch.setattr(distributed, "setup", lambda device="auto": distributed.Distributed(device=META))
    import openflamingo.train.loop as loop

    build = loop.build_or_load

    def build_checked(*args, **kwargs):
        model = build(*args, **kwargs)
        install_device_checks(model, META, input_check=False)
        return model

    monkeypatch.setattr(loop, "build_or_load", build_checked)
    run = tiny_run(tokenizer_dir, tmp_path, log={"progress": False, "peak_tflops": 1.0, "mfu": mfu})
    with pytest.raises(ReachedModel, match="forward"):
        train(config_of(run))


def test_evaluation_and_rices_send_inputs_to_the_model_device(tokenizer_dir, monkeypatch, tmp_path):
    def load_checked(*args, **kwargs):
        model = tiny_model(tokenizer_dir)
        install_device_checks(model, META)
        return model

    checkpoint_module.save_pretrained(tiny_model(tokenizer_dir), tmp_path / "model")
    monkeypatch.setattr(checkpoint_module, "load", load_checked)
    base = ["eval", "--checkpoint", tmp_path / "model", "--task", "vqav2", "--shots", 1, "--trials", 1, "--device", "meta",
            "--no-progress", "--output-dir", tmp_path / "out", *VQA_FILES]  # fmt: skip
    with pytest.raises(ReachedModel, match="check_inputs"):  # generation
        cli(*base)
    with pytest.raises(ReachedModel, match="vision"):  # RICES image features of the demonstration pool
        cli(*base, "--demos", "rices")


def test_generate_command_sends_inputs_to_the_model_device(tokenizer_dir, monkeypatch, tmp_path):
    model = tiny_model(tokenizer_dir)
    install_device_checks(model, META)
    monkeypatch.setattr(checkpoint_module, "load", lambda *args, **kwargs: model)
    with pytest.raises(ReachedModel, match="check_inputs"):
        main_cli.main(["generate", "--checkpoint", str(tmp_path), "--prompt", "a photo", "--device", "meta"])


class CountingLoader(SyntheticLoader):
    """Counts how far the underlying loader has really gone; fails at `fail_at` when set."""

    fail_at: int | None = None

    def __next__(self):
        if self.step == self.fail_at:
            raise ValueError(f"bad shard at micro-step {self.step}")
        return super().__next__()


def counting_loader(tokenizer_dir, tmp_path):
    run = config_of(tiny_run(tokenizer_dir, tmp_path))
    model = tiny_model(tokenizer_dir)
    return CountingLoader(run.enabled_datasets(), 0, model.special_ids, 32), model


def test_prefetcher_state_is_that_of_the_last_micro_step_handed_out(tokenizer_dir, tmp_path):
    loader, _ = counting_loader(tokenizer_dir, tmp_path)
    prefetcher = DevicePrefetcher(loader, torch.device("cpu"), prepare=lambda batch: batch, depth=3)
    try:
        first = next(prefetcher)
        while loader.step < 4:  # the thread runs ahead of the consumer
            pass
        assert prefetcher.state_dict()["step"] == 1
        second = next(prefetcher)
        assert prefetcher.state_dict()["step"] == 2
    finally:
        prefetcher.close()
    fresh, _ = counting_loader(tokenizer_dir, tmp_path)
    for expected in (first, second):
        for name, batch in next(fresh).items():
            assert all(torch.equal(batch[k], expected[name][k]) for k in batch)


def test_prefetcher_raises_the_loader_error_in_the_training_loop(tokenizer_dir, tmp_path):
    loader, _ = counting_loader(tokenizer_dir, tmp_path)
    loader.fail_at = 1
    prefetcher = DevicePrefetcher(loader, torch.device("cpu"), prepare=lambda batch: batch)
    try:
        next(prefetcher)
        for _ in range(2):  # and again on every later call
            with pytest.raises(ValueError, match="bad shard at micro-step 1"):
                next(prefetcher)
    finally:
        prefetcher.close()


@pytest.mark.parametrize("images", [1, 0], ids=["with-images", "text-only"])
def test_serving_engine_sends_requests_to_the_model_device(tokenizer_dir, images):
    """A request's prompt and images are prepared on the CPU; the engine's prefill must move them."""
    from helpers.serve import conversation, job
    from serving import tiny_model as serving_model

    from openflamingo.serve.engine import Engine

    model = serving_model(tokenizer_dir)
    request, _ = job(model, conversation(images, words=2), max_tokens=3)
    model.to(META)
    install_device_checks(model, META)
    engine = Engine(model, batch_wait_s=0.0)  # driven on this thread: a failed check propagates here
    engine.submit(request)
    engine._collect()
    with pytest.raises(ReachedModel, match="vision" if images else "lm"):
        engine._admit()


def test_conversation_scoring_sends_inputs_to_the_model_device(tokenizer_dir):
    """The fine-tuning demo's before/after scoring (eval/conversations.py)."""
    from helpers.data import _png

    from openflamingo.data.samples import Conversation, ImageItem, Turn
    from openflamingo.eval.conversations import evaluate_conversations

    model = tiny_model(tokenizer_dir)
    model.to(META)
    install_device_checks(model, META)
    conversation = Conversation(
        "c",
        [Turn("user", "<image>what colour?"), Turn("assistant", "It is red.")],
        [ImageItem(_png("red"), "png")],
    )
    with pytest.raises(ReachedModel, match="check_inputs"):
        evaluate_conversations(model, [conversation], ["red"], progress=False)
