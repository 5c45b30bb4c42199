"""Plain PyTorch twin of the decode launcher: the oracle of the decode tests.

Expands the selected pages to a token mask over the whole (logical) cache and runs math attention,
heads repeated. Same signature and outputs as :func:`sparse_attn_kernels.decode.fwd.decode_fwd`.
"""

import torch

from ._common.paged import logical_cache
from ._common.softmax import accum_dtype, softmax_rows


def visible_keys(seqlens, counts, pages, page_size, kv_len, q_len, causal):
    """bool ``[B, Hkv, Lq, L]``: key ``j`` is in a listed page, below ``seqlens`` and (causal) at most
    ``seqlen - Lq + i`` for query ``i``."""
    batch, n_kv_heads, width = pages.shape
    entry_ok = torch.arange(width, device=pages.device) < counts[..., None].long()  # [B, Hkv, W]
    listed = torch.zeros((batch, n_kv_heads, kv_len + page_size), dtype=torch.bool, device=pages.device)
    tok = torch.where(entry_ok, pages.long(), kv_len // page_size + 1)[..., None] * page_size
    tok = (tok + torch.arange(page_size, device=pages.device)).flatten(2).clamp(max=kv_len + page_size - 1)
    listed.scatter_(2, tok, True)
    listed = listed[..., :kv_len]
    j = torch.arange(kv_len, device=pages.device)
    seq = seqlens.long()[:, None, None, None]
    keep = listed[:, :, None, :] & (j < seq)  # [B, Hkv, 1, L]
    if causal and q_len > 1:
        i = torch.arange(q_len, device=pages.device)[:, None]
        keep = keep & (j <= seq - q_len + i)
    return keep.expand(batch, n_kv_heads, q_len, kv_len)


def decode_fwd_ref(q, k_cache, v_cache, seqlens, counts, pages, block_table, causal, scale, page_size,
                   n_splits=None):
    """Math attention of ``q [B, Hq, Lq, D]`` over the listed pages (see :func:`~.decode.fwd.decode_fwd`).

    Keys no query row sees are zeroed first, so that NaN in storage outside the selection never leaks.
    """
    batch, n_q_heads, q_len, head_dim = q.shape
    k, v = logical_cache(k_cache, block_table), logical_cache(v_cache, block_table)
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    group = n_q_heads // n_kv_heads
    pages = pages.expand(batch, n_kv_heads, pages.shape[-1])
    counts = counts.expand(batch, n_kv_heads)
    keep = visible_keys(seqlens, counts, pages, page_size, kv_len, q_len, causal)
    keep = keep.repeat_interleave(group, 1)  # [B, Hq, Lq, L]
    acc = accum_dtype(q.dtype)
    k = k.to(acc).repeat_interleave(group, 1)
    v = v.to(acc).repeat_interleave(group, 1)
    seen = keep.any(2)[..., None]  # [B, Hq, L, 1]
    k, v = k.masked_fill(~seen, 0.0), v.masked_fill(~seen, 0.0)
    s = (q.to(acc) @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~keep, float("-inf"))
    o, lse = softmax_rows(s.flatten(0, 1), v.flatten(0, 1))
    return o.view(q.shape).to(q.dtype), lse.view(q.shape[:3])
