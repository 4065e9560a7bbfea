"""Packed rows: several documents in one sequence, each seeing only its own tokens and images.

`document_ids` (B, L) holds 0 on padding and 1, 2, ... for the documents of a row, in order; the images of a row are
its documents' images in order.

Self-attention over packed rows runs per document where the LM takes transformers' attention interface: its
attention becomes `document_attention`, which calls SDPA with `is_causal` on each document's span of the row and, when
no spans are given (unpacked batches, generation), is transformers' own SDPA attention. LMs without that interface
get the dense (B, 1, L, L) block-diagonal mask of `packed_attention_mask`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..errors import InputError

DOCUMENT_ATTENTION = "openflamingo_documents"
# Per row, the [start, end) of each run of equal document ids (padding runs included), in order.
DocumentSpans = list[list[tuple[int, int]]]


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) position of the first token of each token's document."""
    positions = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return torch.where(starts, positions, 0).cummax(dim=-1).values


def restart_per_document(is_media, text_time, document_ids):
    """Image indices for packed rows: a token sees only images of its own document (images of a row are its
    documents' images in order). Returns (text_time with 0 before a document's first image, images of earlier
    documents per token)."""
    starts = document_starts(document_ids)
    media_floor = text_time.gather(1, starts) - is_media.gather(1, starts).long()
    return torch.where(text_time > media_floor, text_time, 0), media_floor


def packed_attention_mask(document_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, L, L) additive mask: causal within each document, nothing across documents or from padding."""
    length, device = document_ids.shape[1], document_ids.device
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    allowed = same_document & causal & (document_ids[:, None, :] != 0)
    allowed |= torch.eye(length, dtype=torch.bool, device=device)  # padding sees itself: no all-masked rows
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def equal_runs(values: torch.Tensor) -> list[list[tuple[int, int, int]]]:
    """Per row of `values` (B, L), its runs of equal values as (start, end, value) (one wait for the device)."""
    values = values.cpu()
    length = values.shape[1]
    runs = []
    for row in values:
        starts = [0, *((row[1:] != row[:-1]).nonzero().flatten() + 1).tolist()]
        ends = [*starts[1:], length]
        runs.append([(start, end, int(row[start])) for start, end in zip(starts, ends, strict=True)])
    return runs


def document_spans(document_ids: torch.Tensor) -> DocumentSpans:
    """The runs of equal ids in each row of `document_ids`."""
    return [[(start, end) for start, end, _ in row] for row in equal_runs(document_ids)]


def document_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    document_spans: DocumentSpans | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (B, H, L, D), key/value (B, H_kv, L, D) -> (B, L, H, D).
    With `document_spans`, each document attends causally to itself only (the mask is not needed)."""
    if document_spans is None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if key.shape[2] != query.shape[2]:
        raise InputError("per-document attention takes whole packed rows, without a cache")
    return _attend_per_document(query, key, value, document_spans, dropout, scaling), None


@torch.compiler.disable  # the spans are data: compiled, every new layout would be a new graph
def _attend_per_document(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    document_spans: DocumentSpans,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    grouped = key.shape[1] != query.shape[1]
    rows = []
    # Split, not sliced: the backward of a slice fills a zero tensor of the whole input per slice.
    for spans, *row in zip(document_spans, query.unbind(0), key.unbind(0), value.unbind(0), strict=True):
        lengths = [end - start for start, end in spans]
        pieces = [
            F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=grouped
            )
            for q, k, v in zip(*(tensor.split(lengths, dim=1) for tensor in row), strict=True)
        ]
        rows.append(torch.cat(pieces, dim=1))
    return torch.stack(rows).transpose(1, 2).contiguous()


AttentionInterface.register(DOCUMENT_ATTENTION, document_attention)
AttentionMaskInterface.register(DOCUMENT_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_document_attention(language_model: nn.Module) -> None:
    """Switch an LM on transformers' SDPA attention to `document_attention` (the same function on unpacked
    batches); others (eager, flash, sliding-window or soft-capped attention, no attention interface) stay as they
    are and packed rows give them the dense mask."""
    config = language_model.config
    if (
        getattr(language_model, "_supports_attention_backend", False)
        and config._attn_implementation == "sdpa"
        and getattr(config, "sliding_window", None) is None
        and getattr(config, "attn_logit_softcapping", None) is None
    ):
        language_model.set_attn_implementation(DOCUMENT_ATTENTION)


def runs_document_attention(language_model: nn.Module) -> bool:
    return language_model.config._attn_implementation == DOCUMENT_ATTENTION
