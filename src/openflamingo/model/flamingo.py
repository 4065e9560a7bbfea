"""The Flamingo model: frozen vision encoder -> perceiver resampler -> gated cross-attention into a frozen HF LM.

The LM keeps its class and modules. Forward pre-hooks run a gated cross-attention block on the hidden states entering
the decoder layers `config.cross_attention` places them before. What the hooks read is per-call state owned by the
model alone: `_calling` installs it (a `MediaState`, see media.py, and the positions whose logits are wanted) for the
LM calls of one `forward`, `generate`, `prefill` or `decode_step`, and removes it after, so nothing is left behind in
the layers and nothing outside the model writes it.

Cached decoding has one path: `prefill` (prompts, in chunks if long) and `decode_step` (generated tokens) keep a
`DecodeState` (decoding.py) with the cache, mask, positions and media state; the serving engine, /v1/score and the
evaluation's rank classification all decode through them. `generate` hands the search (greedy, beams, sampling,
stopping) to HF's `generate`, whose LM calls follow the same media rules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .config import FlamingoConfig
from .cross_attention import GatedCrossAttentionBlock
from .decoding import DecodeState
from .few_rows import few_row_products
from .inputs import check_inputs, check_logits_at
from .language import (
    AddedTokenEmbeddings,
    add_special_tokens,
    cache_length,
    find_decoder_layers,
    forward_accepts,
)
from .loss import cross_entropy_sum
from .media import MediaState
from .packing import (
    document_spans,
    document_starts,
    packed_attention_mask,
    runs_document_attention,
    use_document_attention,
)
from .perceiver import PerceiverResampler
from .vision import VisionEncoder


@dataclass
class FlamingoOutput:
    logits: torch.Tensor | None  # None when `targets` ask for the loss alone
    loss: torch.Tensor | None = None  # mean over the labels
    loss_sum: torch.Tensor | None = (
        None  # summed over `targets` (the training loop weighs datasets by tokens)
    )


def hidden_size(config) -> int:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise InputError(f"cannot read the hidden size from {type(config).__name__}")


def next_token_targets(
    labels: torch.Tensor, document_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, targets): a (B, L) bool mask of the positions whose next token is a label (!= -100), and those
    labels in row-major order. In packed rows the last token of a document does not predict the next one's first."""
    targets = labels[:, 1:]
    if document_ids is not None:
        targets = targets.masked_fill(document_ids[:, 1:] != document_ids[:, :-1], -100)
    positions = F.pad(targets != -100, (0, 1), value=False)
    return positions, targets[targets != -100]


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, document_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy averaged over labels != -100 (the HF causal-LM loss)."""
    positions, targets = next_token_targets(labels.to(logits.device), document_ids)
    return F.cross_entropy(logits[positions].float(), targets)


class Flamingo(nn.Module):
    def __init__(
        self, config: FlamingoConfig, vision_encoder: VisionEncoder, language_model: nn.Module, tokenizer
    ):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.special_ids = add_special_tokens(tokenizer, config.special_tokens)
        self.vision_encoder = vision_encoder
        self.perceiver = PerceiverResampler(vision_encoder.dim, config.perceiver)
        self.language_model = language_model
        self.decoder_layers_path, layers = find_decoder_layers(language_model, config.decoder_layers_path)
        lm_dim = hidden_size(language_model.config)
        self.cross_attn_blocks = nn.ModuleDict(
            {
                str(i): GatedCrossAttentionBlock(lm_dim, vision_encoder.dim, config.cross_attention)
                for i in config.cross_attention.block_layers(len(layers))
            }
        )
        if not self.cross_attn_blocks:
            raise InputError(
                f"cross_attention.every_n_layers={config.cross_attention.every_n_layers} leaves no block in a "
                f"{len(layers)}-layer LM"
            )
        self.added_tokens = AddedTokenEmbeddings(language_model, self.special_ids)
        self.vocab_size = self.special_ids.first_added + self.special_ids.num_added

        language_model.requires_grad_(config.train_language_model)
        for index in config.train_language_model_layers:
            if index >= len(layers):
                raise InputError(
                    f"train_language_model_layers: {index} is out of range for a {len(layers)}-layer LM"
                )
            layers[index].requires_grad_(True)
        vision_encoder.requires_grad_(config.train_vision_encoder)
        self._lm_takes_position_ids = forward_accepts(language_model, "position_ids")
        # Read once: the tokenizer's property is C++ that compiled decode steps cannot trace.
        self._media_end_id = tokenizer.eos_token_id if config.cross_attention.media_ends_at_eos else None
        use_document_attention(language_model)
        self._cache_argument = "cache" if forward_accepts(language_model, "cache") else "past_key_values"
        self._last_logits_only = (
            {"logits_to_keep": 1} if forward_accepts(language_model, "logits_to_keep") else {}
        )
        # Per-call state of the hooks, set only by _calling (see the module docstring).
        self._in_call = False
        self._media: MediaState | None = None
        self._logits_at: torch.Tensor | None = None
        # When the loss is computed from the head's inputs (model/loss.py): the hidden states the head was given.
        self._head_inputs: list[torch.Tensor] | None = None
        language_model.register_forward_pre_hook(self._prepare_lm_call, with_kwargs=True)
        language_model.get_output_embeddings().register_forward_pre_hook(self._select_logit_positions)
        language_model.get_output_embeddings().register_forward_hook(self._append_added_logits)
        for i in self.cross_attn_blocks:
            layers[int(i)].register_forward_pre_hook(partial(self._cross_attend, i), with_kwargs=True)

    # ----- hooks on the language model -------------------------------------------------------------------------
    def _prepare_lm_call(self, lm, args, kwargs):
        """Embed Flamingo's own tokens and, with media, work out which image each token of this call sees."""
        input_ids = args[0] if args else kwargs.get("input_ids")
        if input_ids is None:
            if self._media is not None:
                raise InputError("Flamingo needs input_ids (not inputs_embeds) to place images")
            return None
        if self._media is not None:
            self._place_tokens(self._media, input_ids, cache_length(kwargs))
        kwargs["inputs_embeds"] = self.added_tokens.embed(lm.get_input_embeddings(), input_ids)
        kwargs["input_ids"] = None
        if args:  # input_ids was positional: keep the other positional arguments where they were
            args = (None, *args[1:])
        return args, kwargs

    def _place_tokens(
        self, media: MediaState, input_ids: torch.Tensor, num_cached: int | torch.Tensor
    ) -> None:
        cross = self.config.cross_attention
        media.place(
            input_ids,
            num_cached,
            self.special_ids.media,
            self._media_end_id,
            cross.only_attend_immediate_media,
        )

    def _cross_attend(self, key: str, layer, args, kwargs):
        media = self._media
        if media is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        block = self.cross_attn_blocks[key]
        if key not in media.keys_values:
            media.keys_values[key] = block.attn.media_keys_values(media.visual_tokens.to(hidden.dtype))
        keys, values = media.keys_values[key]
        hidden = block(hidden, keys, values, media.media_mask)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _select_logit_positions(self, lm_head, inputs):
        if self._logits_at is None:
            return None
        hidden = inputs[0]
        if self._logits_at.dtype == torch.bool:
            hidden = hidden[self._logits_at]
        else:
            hidden = hidden.flatten(0, 1).index_select(0, self._logits_at)
        if self._head_inputs is not None:  # the loss takes it from here: the LM's own head call gets no rows
            self._head_inputs.append(hidden)
            hidden = hidden[:0]
        return (hidden, *inputs[1:])

    def _append_added_logits(self, lm_head, inputs, logits):
        return self.added_tokens.logits(inputs[0], logits)

    # ----- public API ---------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Flamingo:
        """Frozen backbones stay in eval mode: no dropout noise, no BatchNorm statistics drifting (EfficientNet)."""
        super().train(mode)
        if not self.config.adapts_language_model:
            self.language_model.eval()
        if not self.config.train_vision_encoder:
            self.vision_encoder.eval()
        return self

    @contextmanager
    def _calling(
        self,
        media: MediaState | None = None,
        logits_at: torch.Tensor | None = None,
        head_inputs: list[torch.Tensor] | None = None,
    ) -> Iterator[None]:
        """The hooks' state for the LM calls inside the block: `media` conditions them on images, `logits_at`
        keeps only some positions' logits, `head_inputs` (a list) receives their hidden states instead of the head
        computing logits. Removed on exit, whatever happens."""
        if self._in_call:
            raise RuntimeError("Flamingo calls cannot be nested (a forward inside a forward or generate)")
        self._in_call, self._media, self._logits_at, self._head_inputs = True, media, logits_at, head_inputs
        try:
            yield
        finally:
            self._in_call, self._media, self._logits_at, self._head_inputs = False, None, None, None

    def checkpoint_context_fn(self) -> Callable[[], tuple[AbstractContextManager, AbstractContextManager]]:
        """`context_fn` for torch.utils.checkpoint around decoder layers, so that the recomputation in backward
        (after forward has returned and removed its media state) runs the cross-attention as the forward did.

        Without it the pre-hook would find no media and skip the block: wrong activations and gradients (HF's own
        gradient checkpointing has exactly that problem). The state is snapshotted when the checkpointed layer
        runs, with the keys/values computed so far, and a fresh copy of it is installed for each recomputation."""

        @contextmanager
        def replaying(snapshot: MediaState | None) -> Iterator[None]:
            previous = self._media
            self._media = None if snapshot is None else snapshot.snapshot()
            try:
                yield
            finally:
                self._media = previous

        def context_fn():
            snapshot = None if self._media is None else self._media.snapshot()
            return nullcontext(), replaying(snapshot)

        return context_fn

    def encode_images(
        self,
        images: torch.Tensor | None = None,
        num_images: torch.Tensor | Sequence[int] | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """images (B, T_img, F, C, H, W) -> visual tokens (B, T_img, num_latents, D_vis); or, instead of images,
        their vision-encoder tokens `image_features` (B, T_img, F, num_tokens, D_vis) computed beforehand (a
        feature cache of the frozen encoder), which go straight to the perceiver.

        With `num_images` (B,), only the real images are encoded: the padding slots of a batch (samples with fewer
        images than T_img; packed rows often leave many) get zero tokens, which no text token attends to. Pass it
        as a list, or a CPU tensor, to avoid a device sync."""
        if (images is None) == (image_features is None):
            raise InputError("pass images or image_features (precomputed vision-encoder tokens), exactly one")
        media = images if images is not None else image_features
        encode = self.vision_encoder if images is not None else nn.Identity()
        B, T, num_frames = media.shape[:3]
        real = None
        if num_images is not None:
            real = (torch.arange(T) < torch.as_tensor(num_images, device="cpu").reshape(-1, 1)).flatten()
        if real is None or bool(real.all()):
            tokens = encode(media.flatten(0, 2))
            return self.perceiver(tokens.unflatten(0, (B, T, num_frames)))
        index = real.nonzero().squeeze(1).to(media.device, non_blocking=True)
        selected = media.flatten(0, 1).index_select(0, index)  # (N, F, ...)
        tokens = encode(selected.flatten(0, 1))
        visual = self.perceiver(tokens.unflatten(0, (1, len(index), num_frames)))[0]  # (N, n, D)
        out = visual.new_zeros(B * T, *visual.shape[1:]).index_copy(0, index, visual)
        return out.unflatten(0, (B, T))

    def forward(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_images: torch.Tensor | Sequence[int] | None = None,
        document_ids: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
        validate_inputs: bool = True,
        image_features: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> FlamingoOutput:
        """Logits (and the loss when `labels` are given). `document_ids` (B, L) marks packed rows: 0 on padding,
        1, 2, ... per document; each document then sees only its own earlier tokens and its own images.

        `logits_at` computes the logits only at some positions, returned as (N, vocab) in row-major order: a (B, L)
        bool mask, or the (N,) flat indices `b * L + l` (training needs them only where a label follows, see
        `next_token_targets`; over a large vocabulary the LM head is otherwise a large share of the step's time and
        memory). Indices select without the device sync a mask costs.

        `targets` (N,), with `logits_at`: the token each of those positions predicts. Then the output is the summed
        cross-entropy `loss_sum` and no logits: they are computed a chunk of positions at a time, never all at once
        (model/loss.py), which saves the largest tensors of a training step.

        `image_features` (B, T_img, F, num_tokens, D_vis) replaces `images` with the frozen vision encoder's output
        for them, computed beforehand (`openflamingo.data.features`); give one or the other.

        `validate_inputs=False` skips `check_inputs`, whose data-dependent checks each wait for the device; pass it
        only for inputs already checked (the training loop checks each batch on the CPU before moving it)."""
        if validate_inputs:
            self.check_inputs(input_ids, images, attention_mask, num_images, image_features)
        if logits_at is not None and labels is not None:
            raise InputError("pass labels or logits_at, not both: the loss needs the logits at every label")
        if logits_at is not None:
            check_logits_at(logits_at, input_ids)
        if targets is not None and logits_at is None:
            raise InputError("targets are the tokens predicted at logits_at: pass both")
        lm_kwargs = {"input_ids": input_ids, "use_cache": False}
        if document_ids is None:
            lm_kwargs["attention_mask"] = attention_mask
            lm_kwargs.update(self._position_ids(attention_mask))
        else:
            lm_kwargs.update(self._packed_lm_inputs(document_ids, input_ids))
        media = None
        if images is not None or image_features is not None:
            visual_tokens = self.encode_images(images, num_images, image_features)
            media = MediaState(visual_tokens, document_ids=document_ids, validated=not validate_inputs)
        head = self.language_model.get_output_embeddings()
        if targets is not None and isinstance(head, nn.Linear):
            head_inputs: list[torch.Tensor] = []
            with self._calling(media, logits_at, head_inputs):
                self.language_model(**lm_kwargs)
            (hidden,) = head_inputs
            return FlamingoOutput(
                logits=None, loss_sum=cross_entropy_sum(hidden, targets, head, self.added_tokens)
            )
        with self._calling(media, logits_at):
            logits = self.language_model(**lm_kwargs).logits
        if targets is not None:  # a head that is not one linear map: the logits, then their loss
            loss_sum = F.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum")
            return FlamingoOutput(logits=None, loss_sum=loss_sum)
        loss = causal_lm_loss(logits, labels, document_ids) if labels is not None else None
        return FlamingoOutput(logits=logits, loss=loss)

    def _packed_lm_inputs(
        self, document_ids: torch.Tensor, input_ids: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if tuple(document_ids.shape) != tuple(input_ids.shape):
            raise InputError(
                f"document_ids shape {tuple(document_ids.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        if not self._lm_takes_position_ids:
            raise InputError(
                f"{type(self.language_model).__name__} takes no position_ids, so packed documents cannot restart "
                "their positions; use padded batches"
            )
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) - document_starts(document_ids)
        if runs_document_attention(self.language_model):
            return {"position_ids": positions, "document_spans": document_spans(document_ids)}
        dtype = self.language_model.get_input_embeddings().weight.dtype
        return {"attention_mask": packed_attention_mask(document_ids, dtype), "position_ids": positions}

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        num_images: torch.Tensor | Sequence[int] | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """HF `generate` (greedy, beam search, sampling, ...) conditioned on the images; stops where the prompt
        format's answers end (`stop_token_ids`).

        Prompts are left-padded; returns the prompt followed by the new tokens, like HF generate. On CUDA, one-beam
        decoding of an LM that compiles (`_can_compile_fullgraph`) uses a static KV cache, which HF then decodes
        with a compiled, CUDA-graphed forward; pass `cache_implementation="dynamic"` to turn that off.
        """
        self.check_inputs(input_ids, images, attention_mask, num_images)
        if self._decodes_compiled(input_ids.device, generate_kwargs):
            generate_kwargs["cache_implementation"] = "static"
        generate_kwargs.setdefault("eos_token_id", self.stop_token_ids())
        generate_kwargs.setdefault("pad_token_id", self.special_ids.pad)
        longer = self.multi_token_stops()
        if longer and "stop_strings" not in generate_kwargs:  # HF matches text spread over several tokens
            generate_kwargs.update(stop_strings=longer, tokenizer=self.tokenizer)
        lm_kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, **generate_kwargs}
        media = None
        if images is not None:  # tokens after the prompt's columns are generated: they start no image
            visual_tokens = self.encode_images(images, num_images)
            media = MediaState(visual_tokens, prompt_length=input_ids.shape[1], validated=True)
        with (
            self._config_vocab_includes_added_tokens(),
            self._calling(media),
            few_row_products(input_ids.device),
        ):
            return self.language_model.generate(**lm_kwargs)

    def _decodes_compiled(self, device: torch.device, generate_kwargs: dict) -> bool:
        cache_given = any(k in generate_kwargs for k in ("cache_implementation", "past_key_values", "cache"))
        return (
            device.type == "cuda"
            and not cache_given
            and generate_kwargs.get("num_beams", 1) == 1
            and generate_kwargs.get("use_cache", True)
            and getattr(self.language_model, "_can_compile_fullgraph", False)
        )

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        num_images: torch.Tensor | Sequence[int] | None = None,
        state: DecodeState | None = None,
    ) -> tuple[torch.Tensor, DecodeState]:
        """Feed prompt tokens (B, L), left-padded, conditioned on `images` (B, T_img, F, C, H, W): returns each
        row's last logits (B, vocab) and the state that `decode_step` (or the next chunk) continues from.

        A long prompt can be fed in chunks: pass the previous chunk's `state` (the images come with the first)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if state is None:
            media = None
            if images is not None:
                media = MediaState(self.encode_images(images, num_images))
            empty = attention_mask[:, :0]
            state = DecodeState(None, empty, attention_mask.new_zeros(input_ids.shape[0]), media)
        elif images is not None:
            raise InputError("prefill: a later chunk of a prompt takes no images (pass them with the first)")
        positions = (state.next_positions[:, None] + attention_mask.cumsum(-1) - 1).clamp(min=0)
        if state.media is not None:
            state.media.prompt_length = None  # every token of a prompt may start an image
        logits = self._cached_call(state, input_ids, attention_mask, positions, last_only=True)
        return logits[:, -1], state

    @torch.no_grad()
    def decode_step(
        self,
        state: DecodeState,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Feed generated tokens, (B,) or (B, k), to `state` (advanced in place): the logits of the last one (B,
        vocab), or of every one (B, k, vocab) with `all_logits`. Generated tokens start no image and, with
        `media_ends_at_eos`, end none. `attention_mask` (B, k) marks right padding in the new tokens."""
        tokens = tokens[:, None] if tokens.ndim == 1 else tokens
        if attention_mask is None:
            attention_mask = torch.ones_like(tokens)
        positions = state.next_positions[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
        if state.media is not None:
            state.media.prompt_length = state.columns
        logits = self._cached_call(state, tokens, attention_mask, positions, last_only=not all_logits)
        return logits if all_logits else logits[:, -1]

    def _cached_call(
        self,
        state: DecodeState,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        last_only: bool,
    ) -> torch.Tensor:
        state.mask = torch.cat([state.mask, attention_mask.to(state.mask.dtype)], dim=1)
        state.next_positions = state.next_positions + attention_mask.sum(-1)
        kwargs = {"input_ids": input_ids, "attention_mask": state.mask, "use_cache": True}
        if state.cache is not None:
            kwargs[self._cache_argument] = state.cache
        if self._lm_takes_position_ids:
            kwargs["position_ids"] = positions
        if last_only:
            kwargs.update(self._last_logits_only)
        with self._calling(state.media), few_row_products(input_ids.device):
            out = self.language_model(**kwargs)
        state.cache = getattr(out, "cache", None) or out.past_key_values
        return out.logits

    def stop_strings(self) -> list[str]:
        """Where answers end in this model's prompt format, as text: its end of chunk (OpenFlamingo's
        <|endofchunk|>), or the chat template's end of turn, and the format's own `stop` strings."""
        end_of_chunk = self.config.special_tokens.end_of_chunk
        return self.config.prompt_format.stop_strings(self.tokenizer, end_of_chunk)

    def stop_token_ids(self) -> list[int]:
        """The ids of the stop strings that are single tokens."""
        vocab = self.tokenizer.get_vocab()
        return [vocab[text] for text in self.stop_strings() if text in vocab]

    def multi_token_stops(self) -> list[str]:
        """The stop strings that span several tokens (IDEFICS-instruct's <end_of_utterance>): matched as text."""
        vocab = self.tokenizer.get_vocab()
        return [text for text in self.stop_strings() if text not in vocab]

    @contextmanager
    def _config_vocab_includes_added_tokens(self) -> Iterator[None]:
        # transformers 4.x beam search reshapes scores with config.vocab_size; ours are wider by the added tokens.
        text_config = self.language_model.config.get_text_config()
        base = text_config.vocab_size
        text_config.vocab_size = self.vocab_size
        try:
            yield
        finally:
            text_config.vocab_size = base

    def _position_ids(self, attention_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        # Only left padding needs explicit positions; right-padded batches keep the LM's own arange (on padding too,
        # as OpenFlamingo computes it). Asking costs a device sync, as the LM's own mask check does anyway.
        if attention_mask is None or not self._lm_takes_position_ids or bool(attention_mask[:, 0].all()):
            return {}
        return {"position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0)}

    def check_inputs(self, input_ids, images, attention_mask, num_images, image_features=None) -> None:
        """Clear errors for inputs that would otherwise fail deep inside or silently ignore images (`inputs.py`)."""
        check_inputs(self, input_ids, images, attention_mask, num_images, image_features)
