"""Triton forward kernel for stripe-sparse (vertical + slash) attention and its launcher.

One program handles one query block of one (batch, query head) and runs a single online
softmax over two parts of the lowered mask (docs/masks.md, StripeSparseMask):

1. the *block part*: the sorted key blocks crossed by a slash. Tiles flagged full are computed
   unmasked; the others keep a pair iff its diagonal ``i - j`` is a slash (``diag_keep``, one
   byte per offset) or its key is a vertical column (``col_keep``, one byte per key);
2. the *column part*: the vertical columns outside the block part, gathered ``TILE_C`` at a time.

Every kept pair belongs to exactly one part, so the two parts share one ``(m, l, acc)``.
Causal masking is bottom-right (``j <= i + Lk - Lq``). Lengths and list widths are runtime
values, never constexprs, so a new length does not recompile the kernel.
"""

import torch
import triton
import triton.language as tl

from .._common.config import fwd_configs, dot_precision, pow2_at_least
from .._common.tile_jit import finite_rows

LOG2E = 1.4426950408889634


@triton.jit
def _softmax_step(acc, l_i, m_i, bad, q, k, v, keep, qk_scale, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over a [BLOCK_M, N] score tile; ``keep`` applies when MASKED (and then
    values of excluded keys are zeroed, ``bad`` flags the rows that see a non-finite value)."""
    # -- compute qk (log2 domain) ----
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, N]
    if MASKED:
        qk = tl.where(keep, qk, float("-inf"))
        v_ok = finite_rows(v)  # [N]
        bad = tl.maximum(bad, tl.max((keep & (v_ok[None, :] == 0)).to(tl.int32), 1))
        v = tl.where(v_ok[:, None] != 0, v, 0.0)
    # -- online softmax update; rows that have seen nothing keep m = -inf ----
    m_new = tl.maximum(m_i, tl.max(qk, 1))  # [BLOCK_M]
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_ref[:, None])  # [BLOCK_M, N]
    alpha = tl.math.exp2(m_i - m_ref)  # [BLOCK_M]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new, bad


@triton.jit(do_not_specialize=["q_len", "kv_len", "n_q_blocks", "width", "col_width", "mask_b_stride"])
def _stripe_sparse_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    bcount_ptr, bindex_ptr, bfull_ptr, ccount_ptr, cindex_ptr, diag_ptr, vert_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
    n_q_heads, q_len, kv_len, n_q_blocks, width, col_width, mask_b_stride, qk_scale,
    GROUP: tl.constexpr, MASK_HEAD_DIV: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_N: tl.constexpr, TILE_C: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # 1-D grid, query block fastest (programs running together share one head's K/V in L2)
    pid = tl.program_id(0)
    pid_m = pid % n_q_blocks
    pid_bh = pid // n_q_blocks
    b = (pid_bh // n_q_heads).to(tl.int64)
    h = (pid_bh % n_q_heads).to(tl.int64)
    h_kv = h // GROUP
    mrow = b * mask_b_stride + h // MASK_HEAD_DIV  # flat (batch, head) row of the mask tensors
    row = mrow * n_q_blocks + pid_m  # flat (batch, head, query block) row

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, HEAD_DIM_PAD)  # [D]
    d_ok = offs_d[None, :] < HEAD_DIM  # [1, D]
    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < q_len) & d_ok, other=0.0)  # [BLOCK_M, D]
    k_base = k_ptr + b * stride_kb + h_kv * stride_kh + offs_d[None, :]
    v_base = v_ptr + b * stride_vb + h_kv * stride_vh + offs_d[None, :]
    diag_row = diag_ptr + mrow * (q_len + kv_len - 1) + (kv_len - 1)  # diag_row[i - j]: is i - j a slash
    vert_row = vert_ptr + mrow * kv_len

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    bad = tl.zeros([BLOCK_M], dtype=tl.int32)  # rows that saw a non-finite value
    causal_shift = kv_len - q_len  # bottom-right: query i sees key j iff j <= i + causal_shift
    last_q = pid_m * BLOCK_M + BLOCK_M - 1
    row_ok = offs_m[:, None] < q_len  # [BLOCK_M, 1]
    kb_limit = kv_len - 1  # last key any query of this block may see
    if IS_CAUSAL:
        kb_limit = last_q + causal_shift

    # -- block part: key blocks crossed by a slash ----
    count = tl.load(bcount_ptr + row)
    for it in range(0, count):
        kb = tl.load(bindex_ptr + row * width + it).to(tl.int64)
        full = tl.load(bfull_ptr + row * width + it) != 0
        for sub in tl.static_range(BLOCK_N // TILE_N):
            start_n = kb * BLOCK_N + sub * TILE_N
            offs_n = start_n + tl.arange(0, TILE_N)  # [TILE_N]
            needs_mask = (full == 0) | (start_n + TILE_N > kv_len)
            if IS_CAUSAL:
                needs_mask = needs_mask | (start_n + TILE_N - 1 > pid_m * BLOCK_M + causal_shift)
            if start_n <= kb_limit:  # causal: else the tile lies above the diagonal for every query
                col_ok = offs_n[:, None] < kv_len  # [TILE_N, 1]
                k = tl.load(k_base + offs_n[:, None] * stride_kn, mask=col_ok & d_ok, other=0.0)  # [TILE_N, D]
                v = tl.load(v_base + offs_n[:, None] * stride_vn, mask=col_ok & d_ok, other=0.0)  # [TILE_N, D]
                if needs_mask:
                    pair_ok = row_ok & (offs_n[None, :] < kv_len)  # [BLOCK_M, TILE_N]
                    on_slash = tl.load(diag_row + (offs_m[:, None] - offs_n[None, :]), mask=pair_ok, other=0)
                    on_col = tl.load(vert_row + offs_n, mask=offs_n < kv_len, other=0)  # [TILE_N]
                    keep = pair_ok & ((on_slash != 0) | (on_col[None, :] != 0))
                    if IS_CAUSAL:
                        keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
                    acc, l_i, m_i, bad = _softmax_step(acc, l_i, m_i, bad, q, k, v, keep, qk_scale, True, DOT_PRECISION)
                else:
                    acc, l_i, m_i, bad = _softmax_step(acc, l_i, m_i, bad, q, k, v, row_ok, qk_scale, False, DOT_PRECISION)

    # -- column part: vertical columns outside the block part, gathered TILE_C at a time ----
    col_count = tl.load(ccount_ptr + row)
    col_row = cindex_ptr + row * col_width
    for c0 in range(0, col_count, TILE_C):
        first = tl.load(col_row + c0)  # sorted: if the first column is above the diagonal, all are
        if first <= kb_limit:
            offs_c = c0 + tl.arange(0, TILE_C)  # [TILE_C]
            c_ok = offs_c < col_count
            cols = tl.load(col_row + offs_c, mask=c_ok, other=0).to(tl.int64)  # [TILE_C]
            k = tl.load(k_base + cols[:, None] * stride_kn, mask=c_ok[:, None] & d_ok, other=0.0)  # [TILE_C, D]
            v = tl.load(v_base + cols[:, None] * stride_vn, mask=c_ok[:, None] & d_ok, other=0.0)  # [TILE_C, D]
            keep = c_ok[None, :] & row_ok  # [BLOCK_M, TILE_C]
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + causal_shift)
            acc, l_i, m_i, bad = _softmax_step(acc, l_i, m_i, bad, q, k, v, keep, qk_scale, True, DOT_PRECISION)

    # -- epilogue: rows that saw no key give o = 0 and lse = -inf; a NaN row keeps NaN in both ----
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]  # [BLOCK_M, D]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # [BLOCK_M]
    o = tl.where(bad[:, None] != 0, float("nan"), o)
    lse = tl.where(bad != 0, float("nan"), lse)
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :]
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=row_ok & d_ok)
    tl.store(lse_ptr + pid_bh.to(tl.int64) * q_len + offs_m, lse, mask=offs_m < q_len)


_autotuned_kernel = triton.autotune(
    configs=fwd_configs(),
    key=["GROUP", "IS_CAUSAL", "BLOCK_M", "BLOCK_N", "TILE_N", "TILE_C", "HEAD_DIM_PAD", "DOT_PRECISION"],
)(_stripe_sparse_fwd_kernel)


def _mask_head_div(mask_heads, n_q_heads, n_kv_heads):
    if mask_heads == n_q_heads:
        return 1
    return n_q_heads // n_kv_heads if mask_heads == n_kv_heads else n_q_heads


def stripe_sparse_fwd(q, k, v, block_counts, block_indices, block_full, col_counts, col_indices,
                      diag_keep, col_keep, block_m, block_n, causal, scale):
    """Launch the forward kernel.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` with unit last stride.
        block_counts: int32 ``[Bm, Hm, NQB]``; block_indices: int32 ``[Bm, Hm, NQB, W]`` sorted key blocks;
            block_full: int8 ``[Bm, Hm, NQB, W]``. ``Bm in (1, B)``, ``Hm in (1, Hkv, Hq)``.
        col_counts: int32 ``[Bm, Hm, NQB]``; col_indices: int32 ``[Bm, Hm, NQB, CW]`` sorted key columns.
        diag_keep: int8 ``[Bm, Hm, Lq + Lk - 1]`` (index ``s + Lk - 1``); col_keep: int8 ``[Bm, Hm, Lk]``.
        block_m, block_n: tile of the block part (powers of two, 16..128).
        causal: bottom-right aligned causal masking on top of the mask.
        scale: softmax scale.

    Returns:
        ``(o, lse)``: o ``[B, Hq, Lq, D]`` in q's dtype, lse ``[B, Hq, Lq]`` float32 (natural log).

    Example:
        >>> o, lse = stripe_sparse_fwd(q, k, v, *lowered_tensors, 64, 64, True, 0.125)  # doctest: +SKIP
    """
    batch, n_q_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    n_q_blocks = block_counts.shape[-1]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_q_heads, q_len), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    if kv_len == 0:
        return o.zero_(), lse.fill_(float("-inf"))
    mask_batch, mask_heads = block_counts.shape[:2]
    tensors = [x.contiguous() for x in (block_counts, block_indices, block_full, col_counts, col_indices,
                                        diag_keep, col_keep)]
    tile_c = 32 if head_dim > 128 else 64
    grid = (n_q_blocks * batch * n_q_heads,)
    _autotuned_kernel[grid](
        q, k, v, o, lse, *tensors,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        n_q_heads, q_len, kv_len, n_q_blocks, block_indices.shape[-1], col_indices.shape[-1],
        mask_heads if mask_batch > 1 else 0, scale * LOG2E,
        GROUP=n_q_heads // n_kv_heads, MASK_HEAD_DIV=_mask_head_div(mask_heads, n_q_heads, n_kv_heads),
        IS_CAUSAL=bool(causal), BLOCK_M=block_m, BLOCK_N=block_n, TILE_N=min(block_n, 64), TILE_C=tile_c,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=pow2_at_least(head_dim, 16), DOT_PRECISION=dot_precision(q.dtype),
    )
    return o, lse
