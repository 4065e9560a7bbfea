"""One cached decode path: `Flamingo.prefill` / `decode_step` give what `generate` gives, in one piece or in chunks,
for OpenFlamingo's block recipe and IDEFICS' (whose media end at an end-of-sequence token); and the hooks' state
exists only inside the model's own calls."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from helpers.model import batch, tiny_config
from transformers import CompileConfig

from openflamingo import build_flamingo

IDEFICS_BLOCKS = dict(
    norm="rmsnorm",
    feed_forward="swiglu",
    ff_dim=48,
    qk_norm=True,
    gate="vector",
    group_position="first",
    media_ends_at_eos=True,
)
RECIPES = {"openflamingo": {}, "idefics": IDEFICS_BLOCKS}


def prompts(model) -> list[str]:
    eos = model.tokenizer.eos_token
    # An end of sequence between images: with media_ends_at_eos the text after it sees no image until the next one.
    return [f"<image>a red cat{eos} then text<image>a dog sits on", f"question {eos}<image>the sky is"]


@pytest.fixture(scope="module", params=sorted(RECIPES))
def model(request, tokenizer_dir):
    return build_flamingo(tiny_config(tokenizer_dir, **RECIPES[request.param]), seed=0).eval()


def greedy_steps(model, logits, state, steps: int) -> list[torch.Tensor]:
    tokens = []
    for _ in range(steps):
        tokens.append(logits.argmax(-1))
        logits = model.decode_step(state, tokens[-1])
    return tokens


def test_prefill_and_decode_steps_generate_what_generate_generates(model):
    inputs = batch(model, prompts(model), [2, 1])
    expected = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    logits, state = model.prefill(**inputs)
    tokens = torch.stack(greedy_steps(model, logits, state, 6), dim=1)
    assert torch.equal(tokens, expected[:, inputs["input_ids"].shape[1] :])
    assert state.columns == inputs["input_ids"].shape[1] + 6 and model._media is None


@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_a_prompt_prefilled_in_chunks_continues_as_when_prefilled_at_once(model, chunk):
    inputs = batch(model, prompts(model)[:1], [2])
    whole_logits, whole = model.prefill(**inputs)
    ids, state = inputs["input_ids"], None
    for start in range(0, ids.shape[1], chunk):
        images = inputs["images"] if state is None else None
        logits, state = model.prefill(ids[:, start : start + chunk], images=images, state=state)
    torch.testing.assert_close(logits, whole_logits, atol=1e-5, rtol=0)
    assert torch.equal(state.media.images_seen, whole.media.images_seen)
    token = whole_logits.argmax(-1)
    torch.testing.assert_close(
        model.decode_step(state, token), model.decode_step(whole, token), atol=1e-5, rtol=0
    )


def test_static_cache_decoding_compiles_without_graph_breaks_and_generates_the_same_tokens(model):
    # What generate does on CUDA (a static cache, which HF decodes with a compiled forward), here on CPU with the
    # eager backend: fullgraph=True fails on any graph break in the hooks, the media state or the attention.
    inputs = batch(model, prompts(model), [2, 1])
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    expected = model.generate(**inputs, **greedy)
    compile_config = CompileConfig(backend="eager", mode=None, fullgraph=True)
    compile_config._compile_all_devices = True  # HF compiles only on accelerators otherwise
    torch._dynamo.reset()
    static = model.generate(**inputs, **greedy, cache_implementation="static", compile_config=compile_config)
    assert torch.equal(static, expected)
    assert model._decodes_compiled(torch.device("cuda"), {})
    assert not model._decodes_compiled(torch.device("cpu"), {})
    assert not model._decodes_compiled(torch.device("cuda"), {"num_beams": 2})
    assert not model._decodes_compiled(torch.device("cuda"), {"use_cache": False})
    assert not model._decodes_compiled(torch.device("cuda"), {"cache_implementation": "dynamic"})


def test_a_later_chunk_takes_no_images(model):
    inputs = batch(model, prompts(model)[:1], [2])
    _, state = model.prefill(inputs["input_ids"][:, :4], images=inputs["images"])
    with pytest.raises(ValueError, match="later chunk"):
        model.prefill(inputs["input_ids"][:, 4:], images=inputs["images"], state=state)


def test_a_fork_continues_without_changing_the_prompt_state(model):
    inputs = batch(model, prompts(model), [2, 1])
    logits, prompt = model.prefill(**inputs)
    token = logits.argmax(-1)
    fork = prompt.fork(3)
    forked = model.decode_step(fork, token.repeat_interleave(3), all_logits=True)
    assert forked.shape[:2] == (6, 1) and len(fork) == 6 and prompt.columns == inputs["input_ids"].shape[1]
    alone = model.decode_step(prompt, token)
    torch.testing.assert_close(forked[::3, -1], alone, atol=1e-5, rtol=0)


def test_generated_tokens_start_no_image(model):
    """A generated <image> keeps attending to the prompt's image (as HF-driven generate does), so it needs none."""
    inputs = batch(model, prompts(model), [2, 1])
    _, state = model.prefill(**inputs)
    seen = state.media.images_seen.clone()
    model.decode_step(state, torch.full((2,), model.special_ids.media))
    assert torch.equal(state.media.images_seen, seen)


def test_the_hooks_state_exists_only_inside_the_models_calls(model):
    inputs = batch(model, prompts(model), [2, 1])
    model(**inputs)
    model.generate(**inputs, max_new_tokens=2)
    model.prefill(**inputs)
    assert model._media is None and model._logits_at is None
    with model._calling():
        with pytest.raises(RuntimeError, match="cannot be nested"):
            model(**inputs)
    assert model._media is None


def test_nothing_outside_the_model_package_touches_the_hooks_state():
    source = Path(__file__).parents[1] / "src" / "openflamingo"
    touching = [
        f"{path.relative_to(source)}:{node.lineno}"
        for path in sorted(source.rglob("*.py"))
        if path.parent.name != "model"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr in ("_media", "_logits_at", "_calling", "_in_call")
    ]
    assert not touching, touching


def test_the_server_prefilling_in_chunks_answers_as_in_one_piece(model, monkeypatch):
    """The engine's chunked prefill carries the media state (IDEFICS: the end of sequence between images too)."""
    from helpers.serve import Answers

    from openflamingo.serve import engine as engine_module
    from openflamingo.serve.sampling import Sampling

    chosen = []

    def recording(logits, samplings):
        tokens = next_tokens(logits, samplings)
        chosen.extend(tokens)
        return tokens

    next_tokens = engine_module.next_tokens
    monkeypatch.setattr(engine_module, "next_tokens", recording)
    inputs = batch(model, prompts(model)[:1], [2])
    ids, images = inputs["input_ids"][0].tolist(), inputs["images"]
    served = []
    for chunk in (512, 3):
        engine = engine_module.Engine(model, prefill_chunk=chunk)
        engine.start()
        try:
            answers = Answers(1)
            sampling = [Sampling.for_choice(0.0, 1.0, None, 0)]
            engine.submit(engine_module.GenerationJob(ids, images, 8, [], sampling, answers))
            assert answers.done.wait(60)
            served.append((list(chosen), answers.reasons, engine.prefills))
            chosen.clear()
        finally:
            engine.stop()
    (whole, reason, one), (chunked, chunked_reason, several) = served
    assert len(whole) == 8 and chunked == whole and chunked_reason == reason and one == 1 and several >= 3
