"""Packed rows: several documents in one sequence, each seeing only its own tokens and images.

`document_ids` (B, L) holds 0 on padding and 1, 2, ... for the documents of a row, in order; the images of a row are
its documents' images in order.
"""

from __future__ import annotations

import torch


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
