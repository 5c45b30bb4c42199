"""Quality of a sparse mask against dense attention: recall of the softmax mass, output error, density.

Computed in query chunks (bounded memory), so it runs at 32k tokens on a CPU.
"""

import math

import torch

from .mask import BlockSparseMask
from .mask_kinds import mask_kind

# Upper bound, in bytes, of one chunk of float32 scores [B, Hq, rows, Lk].
CHUNK_BYTES = 128 * 1024 * 1024


def _rows_keep(mask, r0, r1, n_q_heads, n_kv_heads, device):
    """Token-level keep ``[Bm, Hq|1, r1 - r0, Lk]`` of query rows ``r0:r1``."""
    q_len, kv_len = mask.seq_lens
    if isinstance(mask, BlockSparseMask):
        keep = mask.rows_to_dense(r0, r1)  # [Bm', Hm, R, Lk], token-exact (bits and predicates)
    elif hasattr(mask, "col_keep") and hasattr(mask, "diag_keep"):  # StripeSparseMask
        keep = mask.rows_to_dense(r0, r1)  # columns, slashes and per-query-block columns, token-exact
    else:
        raise TypeError(f"mask must be a BlockSparseMask, a StripeSparseMask or None, got {type(mask).__name__}.")
    keep = keep.to(device)
    hm = keep.shape[1]
    if hm not in (1, n_q_heads):
        keep = keep.repeat_interleave(n_q_heads // n_kv_heads, dim=1)
    return keep


def attention_quality(q, k, v, mask, *, causal=False, scale=None, chunk_bytes=CHUNK_BYTES) -> dict:
    """Per head: recall (kept share of the dense softmax mass), relative output error, density.

    The sparse output is softmax restricted to the kept pairs (what :func:`sparse_attention` computes);
    ``error = ||o_sparse - o_dense||_F / ||o_dense||_F`` over all rows of a (batch, head).

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``.
        mask: BlockSparseMask, StripeSparseMask or None (dense), or a composite mask registered in
            :mod:`sparse_attn.mask_kinds` (PermutedMask (non-causal only), RoutedMask, HeadGroupsMask), which
            reports through its own quality function.
        causal: bottom-right causal attention (both dense and sparse).
        scale: softmax scale (default ``1/sqrt(D)``).

    Returns:
        dict with float64 ``[B, Hq]`` tensors ``recall`` (mean over rows that see a key), ``error`` and
        ``density`` (computed pairs / visible pairs), and floats ``recall_mean``, ``recall_min``,
        ``error_mean``, ``error_max``, ``density_mean``.

    Example:
        >>> q = k = v = torch.randn(1, 2, 256, 32)
        >>> round(attention_quality(q, k, v, None)["recall_mean"], 6)
        1.0
    """
    kind = mask_kind(mask)
    if kind is not None:  # a composite mask grades itself, calling back down here for its inner masks
        return kind.quality(mask, q, k, v, causal=causal, scale=scale)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a [B, H, L, D] tensor, got {getattr(x, 'shape', type(x).__name__)}.")
    batch, n_q_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    if k.shape[:3] != v.shape[:3] or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k and v must share [B, Hkv, Lk] and match q's batch/head dim, got q {list(q.shape)}, "
                         f"k {list(k.shape)}, v {list(v.shape)}.")
    if n_q_heads % n_kv_heads:
        raise ValueError(f"query heads ({n_q_heads}) must be a multiple of key heads ({n_kv_heads}).")
    if mask is not None and not (isinstance(mask, BlockSparseMask) or hasattr(mask, "col_keep")):
        raise TypeError(f"mask must be a BlockSparseMask, a StripeSparseMask or None, got {type(mask).__name__}.")
    if mask is not None and tuple(mask.seq_lens) != (q_len, kv_len):
        raise ValueError(f"mask was built for seq_lens={mask.seq_lens}, but q and k have lengths {(q_len, kv_len)}.")
    shape = (batch, n_q_heads)
    mass = torch.zeros(shape, dtype=torch.float64, device=q.device)
    rows_seen = torch.zeros(shape, dtype=torch.float64, device=q.device)
    kept_pairs = torch.zeros(shape, dtype=torch.float64, device=q.device)
    vis_pairs = torch.zeros(shape, dtype=torch.float64, device=q.device)
    err2 = torch.zeros(shape, dtype=torch.float64, device=q.device)
    ref2 = torch.zeros(shape, dtype=torch.float64, device=q.device)
    for r0, r1, p, o_dense, visible, vf in dense_rows(q, k, v, causal=causal, scale=scale, chunk_bytes=chunk_bytes):
        keep = visible if mask is None else _rows_keep(mask, r0, r1, n_q_heads, n_kv_heads, q.device) & visible
        p_kept = p * keep
        row_mass = p_kept.sum(-1)  # [B, Hq, R]
        o_sparse = (p_kept @ vf) / row_mass.clamp_min(1e-30)[..., None]
        seen = visible.any(-1)  # [R]
        mass += (row_mass * seen).sum(-1).double()
        rows_seen += seen.sum().double()
        kept_pairs += keep.expand(batch, n_q_heads, -1, -1).sum((-1, -2)).double()
        vis_pairs += visible.sum().double()
        err2 += ((o_sparse - o_dense) ** 2).sum((-1, -2)).double()
        ref2 += (o_dense ** 2).sum((-1, -2)).double()
    recall = torch.where(rows_seen > 0, mass / rows_seen.clamp_min(1), torch.ones_like(mass))
    error = torch.sqrt(err2 / ref2.clamp_min(1e-300))
    density = kept_pairs / vis_pairs.clamp_min(1)
    return summarize(recall, error, density)


def dense_rows(q, k, v, *, causal=False, scale=None, chunk_bytes=CHUNK_BYTES):
    """Dense float32 attention by query chunks (bounded memory).

    Yields ``(r0, r1, p [B, Hq, R, Lk], o_dense [B, Hq, R, D], visible bool [R, Lk], v_rep [B, Hq, Lk, D])``
    for rows ``r0:r1``: softmax probabilities (0 on rows without a visible key), the dense output, the
    (bottom-right causal) visibility and the values repeated to query heads.
    """
    batch, n_q_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    group = n_q_heads // n_kv_heads
    kf = k.float().repeat_interleave(group, 1) if group > 1 else k.float()
    vf = v.float().repeat_interleave(group, 1) if group > 1 else v.float()
    step = max(1, chunk_bytes // max(1, 4 * batch * n_q_heads * kv_len))
    j = torch.arange(kv_len, device=q.device)[None, :]
    for r0 in range(0, q_len, step):
        r1 = min(q_len, r0 + step)
        s = (q[:, :, r0:r1].float() @ kf.transpose(-1, -2)) * scale  # [B, Hq, R, Lk]
        visible = torch.ones((r1 - r0, kv_len), dtype=torch.bool, device=q.device)
        if causal:
            visible = j <= torch.arange(r0, r1, device=q.device)[:, None] + (kv_len - q_len)
        p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
        yield r0, r1, p, p @ vf, visible, vf


def summarize(recall, error, density) -> dict:
    """The report dict: float64 ``[B, Hq]`` ``recall``/``error``/``density`` and their means (min/max)."""
    return {
        "recall": recall, "error": error, "density": density,
        "recall_mean": float(recall.mean()) if recall.numel() else math.nan,
        "recall_min": float(recall.min()) if recall.numel() else math.nan,
        "error_mean": float(error.mean()) if error.numel() else math.nan,
        "error_max": float(error.max()) if error.numel() else math.nan,
        "density_mean": float(density.mean()) if density.numel() else math.nan,
    }
