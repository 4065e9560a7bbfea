"""Attaching Flamingo to a Hugging Face causal LM without changing its class or its modules.

Three things are needed from the LM, all through public APIs: its decoder layers (to run a gated cross-attention
block on the hidden states entering some of them, via forward pre-hooks), its input embeddings (to give the new
special tokens their own trainable rows) and its output embeddings (to append their logits).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

MEDIA_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"

# Where common HF causal LMs keep their decoder layers; tried in order before a generic search.
DECODER_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi, ...
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia, RedPajama
    "transformer.blocks",  # MPT
    "model.language_model.layers",
    "transformer.layers",
)


def num_hidden_layers(config) -> int | None:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _get_path(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def find_decoder_layers(lm: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The LM's ModuleList of decoder blocks and its attribute path."""
    if path is not None:
        layers = _get_path(lm, path)
        if not isinstance(layers, nn.ModuleList):
            raise InputError(
                f"decoder_layers_path={path!r} does not name an nn.ModuleList on {type(lm).__name__}"
            )
        return path, layers
    expected = num_hidden_layers(lm.config)
    for candidate in DECODER_LAYER_PATHS:
        layers = _get_path(lm, candidate)
        if isinstance(layers, nn.ModuleList) and (expected is None or len(layers) == expected):
            return candidate, layers
    # Generic fallback: a ModuleList of identical blocks, one per layer of the config.
    for name, module in lm.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and len(module) == expected
            and len({type(m) for m in module}) == 1
        ):
            return name, module
    raise InputError(
        f"cannot find the decoder layers of {type(lm).__name__}: tried {', '.join(DECODER_LAYER_PATHS)} and a search "
        f"for an nn.ModuleList of {expected} identical blocks; name them with decoder_layers_path='attr.path'"
    )


@dataclass
class SpecialTokens:
    """Flamingo's own tokens, by text. OpenFlamingo adds `<|endofchunk|>` and `<image>` (and `<PAD>` when the tokenizer
    has no pad token); IDEFICS' tokenizer already holds `<fake_token_around_image>` and `<image>`, and its documents end
    with the LM's EOS. The `added` tokens are the last ids of the vocabulary, each with its own trainable embedding
    row and logit (AddedTokenEmbeddings), in this order."""

    media: str = MEDIA_TOKEN  # where each image goes
    end_of_chunk: str = END_OF_CHUNK_TOKEN  # closes the text that belongs to an image
    added: list[str] = field(default_factory=lambda: [END_OF_CHUNK_TOKEN, MEDIA_TOKEN])
    pad: str = PAD_TOKEN  # added (as the last id) when the tokenizer has no pad token
    around_media: str | None = None  # IDEFICS: written before and after each run of images

    def __post_init__(self) -> None:
        self.added = list(self.added)
        if self.media not in self.added:
            raise InputError(f"special_tokens.added={self.added} must include the media token {self.media!r}")
        if self.around_media is not None and self.around_media not in self.added:
            raise InputError(
                f"special_tokens.added={self.added} must include around_media {self.around_media!r}"
            )

    def model_text(self, text: str) -> str:
        """Text in the library's convention (`<image>` where each image goes, `<|endofchunk|>` closing its text, as
        prompt formats, eval templates and data write it) in this model's own tokens."""
        if self.end_of_chunk != END_OF_CHUNK_TOKEN:
            text = text.replace(END_OF_CHUNK_TOKEN, self.end_of_chunk)
        if self.media != MEDIA_TOKEN:
            text = text.replace(MEDIA_TOKEN, self.media)
        if self.around_media is not None:
            text = self._wrap_image_runs(text)
        return text

    def _wrap_image_runs(self, text: str) -> str:
        """One around_media before and after each run of images, as IDEFICS' processor writes them; a run already
        wrapped (model text given again) comes out the same."""
        around, media = re.escape(self.around_media), re.escape(self.media)

        def wrap(run: re.Match) -> str:
            count = run.group(0).count(self.media)
            return self.around_media + self.around_media.join([self.media] * count) + self.around_media

        return re.sub(f"(?:{around})?{media}(?:(?:{around})?{media})*(?:{around})?", wrap, text)

    def model_text_and_spans(
        self, text: str, spans: list[tuple[int, int]]
    ) -> tuple[str, list[tuple[int, int]]]:
        """`model_text`, with [start, end) spans of `text` moved to where they land in the result."""
        out, moved, cursor = "", [], 0
        for start, end in spans:
            out += self.model_text(text[cursor:start])
            begin = len(out)
            out += self.model_text(text[start:end])
            moved.append((begin, len(out)))
            cursor = end
        return out + self.model_text(text[cursor:]), moved


@dataclass(frozen=True)
class SpecialTokenIds:
    media: int
    end_of_chunk: int
    pad: int
    first_added: int  # ids >= first_added are Flamingo's own tokens, embedded by AddedTokenEmbeddings
    num_added: int
    around_media: int | None = None


def add_special_tokens(tokenizer, tokens: SpecialTokens | None = None) -> SpecialTokenIds:
    """Add the model's own tokens to `tokenizer` (OpenFlamingo's by default), as OpenFlamingo does.

    Idempotent: a tokenizer that already holds them (e.g. one saved with a checkpoint) is validated instead.
    """
    tokens = tokens or SpecialTokens()
    vocab = tokenizer.get_vocab()
    missing = [token for token in tokens.added if token not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": tokens.pad})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tokens.added}
    end_of_chunk = tokenizer.convert_tokens_to_ids(tokens.end_of_chunk)
    unknown = end_of_chunk == tokenizer.unk_token_id and tokens.end_of_chunk != tokenizer.unk_token
    if end_of_chunk is None or unknown:
        raise InputError(
            f"special_tokens.end_of_chunk={tokens.end_of_chunk!r} is not a token of this tokenizer"
        )
    pad = tokenizer.pad_token_id
    added = set(ids.values()) | ({pad} if tokenizer.pad_token == tokens.pad else set())
    first_added = min(added)
    if added != set(range(first_added, len(tokenizer))):
        listed = ", ".join(f"{token}={i}" for token, i in ids.items())
        raise InputError(
            f"tokenizer special tokens {listed}, pad={pad} must be the last ids of its vocabulary (size "
            f"{len(tokenizer)}); add them to a tokenizer that has no other added tokens"
        )
    around = None if tokens.around_media is None else ids[tokens.around_media]
    return SpecialTokenIds(ids[tokens.media], end_of_chunk, pad, first_added, len(added), around)


class AddedTokenEmbeddings(nn.Module):
    """Embeddings of Flamingo's own tokens, separate from the frozen LM matrices (no vocab-sized gradients).

    `input` rows replace the LM's input embedding for ids >= first_added; `output` rows give those ids' logits.
    With tied LM embeddings the output side reuses the input rows, as a resized tied LM would.
    """

    def __init__(self, lm: nn.Module, ids: SpecialTokenIds):
        super().__init__()
        self.first_added = ids.first_added
        base_in = lm.get_input_embeddings().weight
        base_out = lm.get_output_embeddings()
        if ids.first_added > base_in.shape[0]:
            raise InputError(
                f"tokenizer has {ids.first_added} base tokens but the LM embeds only {base_in.shape[0]}; wrong tokenizer?"
            )
        # HF's mean-resizing: new rows start at the mean of the existing ones, keeping logits in range.
        with torch.no_grad():
            self.input = nn.Parameter(base_in[: ids.first_added].mean(0).repeat(ids.num_added, 1).float())
            self.tied = base_out is not None and base_out.weight is base_in
            if self.tied:
                self.output = None
            else:
                self.output = nn.Parameter(
                    base_out.weight[: ids.first_added].mean(0).repeat(ids.num_added, 1).float()
                )
            has_bias = getattr(base_out, "bias", None) is not None
            self.output_bias = nn.Parameter(torch.zeros(ids.num_added)) if has_bias else None

    def embed(self, base: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        added = input_ids >= self.first_added
        base_embeds = base(input_ids.clamp(max=self.first_added - 1))
        # A one-hot product rather than indexing the rows: the backward of indexing accumulates into the few rows
        # with parallel adds in no fixed order (2 CPU threads, GPUs), so the gradient changed from run to run.
        # The product picks each row exactly (x * 1 + 0), forward and backward are deterministic GEMMs.
        rows = (input_ids - self.first_added).clamp(min=0)
        one_hot = F.one_hot(rows, self.input.shape[0]).to(base_embeds.dtype)
        extra = one_hot @ self.input.to(base_embeds.dtype)
        return torch.where(added[..., None], extra, base_embeds)

    def added_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits of the added tokens alone, (..., num_added)."""
        weight = self.input if self.tied else self.output
        extra = hidden @ weight.to(hidden.dtype).T
        if self.output_bias is not None:
            extra = extra + self.output_bias.to(hidden.dtype)
        return extra

    def logits(self, hidden: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
        """The LM's logits of its base vocabulary followed by the added tokens'."""
        extra = self.added_logits(hidden).to(base_logits.dtype)
        return torch.cat([base_logits[..., : self.first_added], extra], dim=-1)


def forward_accepts(lm: nn.Module, name: str) -> bool:
    return name in inspect.signature(lm.forward).parameters


def cache_length(kwargs: dict) -> int | torch.Tensor:
    """Tokens already in the KV cache of an LM call (the cache kwarg is `past_key_values` or, in newer
    transformers, `cache`; legacy caches are tuples of per-layer (k, v)). A static cache counts on the device: its
    0-d tensor is returned as it is, so that a compiled decode step does not wait for the device."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        length = cache.get_seq_length()
        return length if isinstance(length, torch.Tensor) else int(length)
    if isinstance(cache, (tuple, list)) and len(cache) > 0 and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0
