"""Tiny, offline, deterministic building blocks for tests: a BPE tokenizer and random LM configs per family."""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "a the of in on with and is are this that photo image picture cat dog bird car boat tree house man woman "
    "red green blue yellow black white small large two three sits runs flies park street lake sky question "
    "answer caption what where output yes no circle square triangle shape color"
).split()


def corpus(lines: int = 400):
    for i in range(lines):
        yield " ".join(WORDS[(i * 7 + j * 13) % len(WORDS)] for j in range(4 + i % 9)) + (
            ". " if i % 2 else "? "
        )


def make_tokenizer(directory: Path, vocab_size: int = 300):
    """A byte-level BPE tokenizer with <s>/</s>/<unk> and no pad token, saved as a HF tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(str(directory))
    return hf


# A tiny HF CLIP vision tower (2x2 patches of 16 px on 32 px images).
TINY_CLIP = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=32,
    patch_size=16,
)

# Tiny random configs of real HF architectures: model_type -> config kwargs (vocab filled in by lm_config()).
FAMILIES = {
    "llama": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "mistral": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "qwen2": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "gemma": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
    ),
    "gpt2": dict(n_embd=32, n_layer=4, n_head=4, n_positions=128),
    "gpt_neox": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, rotary_pct=0.5
    ),
    "opt": dict(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=128,
    ),
    "mpt": dict(d_model=32, n_layers=4, n_heads=4, expansion_ratio=2, max_seq_len=128),
    "phi": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4),
}


def lm_config(family: str, tokenizer) -> dict:
    """HF config dict (with model_type) for a tiny random LM using `tokenizer`'s base vocabulary."""
    config = dict(FAMILIES[family], model_type=family, vocab_size=len(tokenizer))
    config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return config
