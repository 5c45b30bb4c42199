"""Reading transformers' attention masks as token predicates: padding ranges (left or right), chunked
prefill and static caches, exactly or not at all.

transformers hands the attention function the 4-D mask that ``sdpa_mask`` built (bool ``[B, 1, Lq, Lk]``,
True = attend) whenever a batch is padded or a KV cache precedes the queries. :func:`padding_ranges`
finds the valid ``[start, end)`` of queries and keys per batch row and checks that ranges (plus the
bottom-right causal band aligned at their ends) reproduce the mask pair for pair; any other mask
(holes, packed documents in ``position_ids``, custom masks) returns None and the call stays dense.
"""

from typing import Optional, Tuple

import torch

from ..mask import ranges_from_attention_mask

_CACHE: dict = {}  # one entry: the analysis of the last mask seen (a forward reuses one mask in every layer)


def _keep(attention_mask: torch.Tensor) -> torch.Tensor:
    """bool ``[B, H|1, Lq, Lk]``: True where attention is allowed (bool masks as given, float masks == 0)."""
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask == 0


def padding_ranges(attention_mask: torch.Tensor, causal: bool) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(q_range, kv_range)`` int32 ``[B, 2]`` that reproduce ``attention_mask`` exactly, or None
    (``q_range`` is None when every query row is valid and the diagonal is the plain ``Lk - Lq`` one).

    Args:
        attention_mask: transformers' SDPA mask ``[B, 1|H, Lq, Lk]`` (bool, or float with 0 = attend).
        causal: the call is causal: the band ``j - i <= kv_end_b - q_end_b`` is part of the reproduction.
    """
    if attention_mask.dim() != 4:
        return None
    key = (id(attention_mask), attention_mask.data_ptr(), tuple(attention_mask.shape), attention_mask._version,
           bool(causal))
    if key in _CACHE:
        return _CACHE[key]
    result = _analyse(_keep(attention_mask), causal)
    _CACHE.clear()
    _CACHE[key] = result
    return result


def _analyse(keep: torch.Tensor, causal: bool):
    if keep.shape[1] != 1 and not bool((keep == keep[:, :1]).all()):
        return None  # per-head masks are not padding
    keep = keep[:, 0]  # [B, Lq, Lk]
    batch, q_len, kv_len = keep.shape
    try:
        q_range = ranges_from_attention_mask(keep.any(2))  # rows that see something
        kv_range = ranges_from_attention_mask(keep.any(1))  # keys that someone sees
    except ValueError:
        return None  # holes: not a padding mask
    i = torch.arange(q_len, device=keep.device)
    j = torch.arange(kv_len, device=keep.device)
    qr, kr = q_range.long(), kv_range.long()
    keys = ((j[None, :] >= kr[:, :1]) & (j[None, :] < kr[:, 1:]))[:, None, :]  # [B, 1, Lk]
    rows = ((i[None, :] >= qr[:, :1]) & (i[None, :] < qr[:, 1:]))[:, :, None]  # [B, Lq, 1]
    # (a) rows and keys aligned at their own ends (left padding, static caches, chunked prefill);
    # (b) every row valid, the plain bottom-right diagonal (right padding: pad rows see the real keys)
    candidates = [(q_range, kr[:, 1] - qr[:, 1], rows), (None, torch.full_like(kr[:, 1], kv_len - q_len), True)]
    for q_rng, shift, row_ok in candidates:
        want = keys & row_ok
        if causal:
            want = want & (j[None, None, :] - i[None, :, None] <= shift[:, None, None])
        if torch.equal(want.expand_as(keep), keep):
            return (None if q_rng is None else q_rng.to(torch.int32)), kv_range.to(torch.int32)
    return None
