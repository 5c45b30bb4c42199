"""Quality report of a :class:`~sparse_attn.routed.RoutedMask` (same keys as :func:`~sparse_attn.attention_quality`)."""

import torch

from .quality import CHUNK_BYTES, dense_rows, summarize
from .routed import _incidence, routed_attention


def _fit(x, n_q_heads, n_kv_heads):
    """Repeat kv-head rows of ``x [Pb, Hkv, ...]`` to query heads (1 and Hq pass through)."""
    return x if x.shape[1] in (1, n_q_heads) else x.repeat_interleave(n_q_heads // n_kv_heads, 1)


def routed_quality(mask, q, k, v, *, causal=False, scale=None, chunk_bytes=CHUNK_BYTES) -> dict:
    """Per head: recall (dense softmax mass on the pairs of the query's clusters; 0 for a query in no
    cluster), relative error of :func:`routed_attention` against dense attention, density.

    Returns the dict of :func:`~sparse_attn.attention_quality` (float64 ``[B, Hq]`` tensors and their means).
    """
    mask.check_causal(causal)
    batch, n_q_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    o_routed = routed_attention(q.float(), k.float(), v.float(), mask, causal=causal, scale=scale).float()
    inc_q = _incidence(mask.q_index, q_len)  # [Pb, Ph, Lq, C]
    inc_k = _fit(_incidence(mask.k_index, kv_len), n_q_heads, n_kv_heads)  # [Pb, Ph', Lk, C]
    shape = (batch, n_q_heads)
    mass, rows_seen, err2, ref2 = (torch.zeros(shape, dtype=torch.float64, device=q.device) for _ in range(4))
    for r0, r1, p, o_dense, visible, _ in dense_rows(q, k, v, causal=causal, scale=scale, chunk_bytes=chunk_bytes):
        keep = ((inc_q[:, :, r0:r1] @ inc_k.transpose(-1, -2)) > 0) & visible  # [Pb, Ph, R, Lk]
        seen = visible.any(-1)  # [R]
        mass += ((p * keep).sum(-1) * seen).sum(-1).double()
        rows_seen += seen.sum().double()
        err2 += ((o_routed[:, :, r0:r1] - o_dense) ** 2).sum((-1, -2)).double()
        ref2 += (o_dense ** 2).sum((-1, -2)).double()
    recall = torch.where(rows_seen > 0, mass / rows_seen.clamp_min(1), torch.ones_like(mass))
    error = torch.sqrt(err2 / ref2.clamp_min(1e-300))
    density = torch.full(shape, mask.density(causal), dtype=torch.float64, device=q.device)
    return summarize(recall, error, density)
