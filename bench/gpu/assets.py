#!/usr/bin/env python
"""The random-weight assets both sides load: a word-level tokenizer and a random fp32 Llama LM in --assets/lm.

    assets.py --assets DIR [--size of3b]

gpu.sh runs it with the peer's transformers 4.57 (whose files transformers 5 also reads), with ours if that fails.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from common import SHAPES, Recorder, Shape, parser, peer_venv_shim


def make_assets(shape: Shape, out: Path) -> None:
    """A word-level tokenizer of `vocab` tokens and a random fp32 Llama LM, saved where both sides load them from.
    Built with the peer's transformers 4.x (gpu.sh), whose files transformers 5 reads too."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    words = specials + [f"w{i}" for i in range(shape.vocab - len(specials))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=2048
    ).save_pretrained(out / "lm")
    config = LlamaConfig(
        vocab_size=shape.vocab,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        **shape.lm,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out / "lm", safe_serialization=True)


def main() -> None:
    args = parser(__doc__).parse_args()
    peer_venv_shim()
    rec = Recorder(Path(args.jsonl), size=args.size)
    started = time.perf_counter()
    make_assets(SHAPES[args.size], Path(args.assets))
    rec("assets", dir=args.assets, seconds=round(time.perf_counter() - started, 1))
    sys.exit(0)


if __name__ == "__main__":
    main()
