"""Triton forward kernel for block-sparse attention and its launcher.

One program handles one query block of one (batch, query head). It walks the
sorted key-block list of that query block and runs a single online softmax over
the kept tiles. In-tile masking is applied only to tiles that need it: the
ragged tail of the keys and, with ``causal``, tiles that cross the diagonal.
Sequence lengths and list lengths are runtime values, never constexprs, so a new
length does not recompile the kernel.
"""

import torch
import triton
import triton.language as tl

from .._common.config import fwd_configs, dot_precision, inner_tile, pow2_at_least

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _visible_prefix(idx_row, count, last_key, BLOCK_N: tl.constexpr):
    """Number of leading entries of a sorted key-block list that start at or before ``last_key``."""
    n_vis = count * 0  # int32 scalar tensor, loop-carried
    for c in range(0, count, 128):
        offs = c + tl.arange(0, 128)
        kb = tl.load(idx_row + offs, mask=offs < count, other=0)
        n_vis += tl.sum(((offs < count) & (kb.to(tl.int64) * BLOCK_N <= last_key)).to(tl.int32), 0)
    return n_vis


@triton.jit(do_not_specialize=["q_len", "kv_len", "n_q_blocks", "width"])
def _block_sparse_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, counts_ptr, indices_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
    stride_cb, stride_ch, stride_ib, stride_ih,
    n_q_heads, q_len, kv_len, n_q_blocks, width, qk_scale,
    GROUP: tl.constexpr, MASK_HEAD_DIV: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # 1-D grid (no 65535 limit on B*H): query block fastest, so programs that run
    # together share the K/V of one head in L2.
    pid = tl.program_id(0)
    pid_m = pid % n_q_blocks
    pid_bh = pid // n_q_blocks
    b = (pid_bh // n_q_heads).to(tl.int64)
    h = (pid_bh % n_q_heads).to(tl.int64)
    h_kv = h // GROUP
    h_mask = h // MASK_HEAD_DIV

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, HEAD_DIM_PAD)  # [D]
    offs_t = tl.arange(0, TILE_N)  # [TILE_N]
    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [BLOCK_M, D]
    k_base = k_ptr + b * stride_kb + h_kv * stride_kh + offs_d[None, :]
    v_base = v_ptr + b * stride_vb + h_kv * stride_vh + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    # bottom-right causal alignment: query i sees key j iff j <= i + (kv_len - q_len)
    causal_shift = kv_len - q_len
    last_q = tl.minimum(pid_m * BLOCK_M + BLOCK_M, q_len) - 1
    row = pid_m.to(tl.int64)
    count = tl.load(counts_ptr + b * stride_cb + h_mask * stride_ch + row)
    idx_row = indices_ptr + b * stride_ib + h_mask * stride_ih + row * width
    if IS_CAUSAL:
        # sorted lists: the blocks that lie entirely above the diagonal form a suffix; skip it
        count = _visible_prefix(idx_row, count, last_q + causal_shift, BLOCK_N)
    for it in range(0, count):
        kb = tl.load(idx_row + it).to(tl.int64)
        for sub in tl.static_range(BLOCK_N // TILE_N):
            start_n = kb * BLOCK_N + sub * TILE_N
            offs_n = start_n + offs_t  # [TILE_N]
            kv_mask = (offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM)  # [TILE_N, D]
            k = tl.load(k_base + offs_n[:, None] * stride_kn, mask=kv_mask, other=0.0)  # [TILE_N, D]
            v = tl.load(v_base + offs_n[:, None] * stride_vn, mask=kv_mask, other=0.0)  # [TILE_N, D]
            # -- compute qk (log2 domain) ----
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, TILE_N]
            # -- mask only the ragged key tail and tiles that cross the causal diagonal ----
            needs_mask = start_n + TILE_N > kv_len
            if IS_CAUSAL:
                needs_mask = needs_mask | (start_n + TILE_N - 1 > pid_m * BLOCK_M + causal_shift)
            if needs_mask:
                keep = offs_n[None, :] < kv_len  # [1, TILE_N]
                if IS_CAUSAL:
                    keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_shift)  # [BLOCK_M, TILE_N]
                qk = tl.where(keep, qk, float("-inf"))
            # -- online softmax; rows that have seen nothing keep m = -inf ----
            m_new = tl.maximum(m_i, tl.max(qk, 1))  # [BLOCK_M]
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_ref[:, None])  # [BLOCK_M, TILE_N]
            alpha = tl.math.exp2(m_i - m_ref)  # [BLOCK_M]
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)  # [BLOCK_M, D]
            m_i = m_new

    # -- epilogue: rows that saw no key give o = 0 and lse = -inf ----
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc / l_safe[:, None]  # [BLOCK_M, D]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # [BLOCK_M]
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :]
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM))
    lse_ptrs = lse_ptr + pid_bh.to(tl.int64) * q_len + offs_m
    tl.store(lse_ptrs, lse, mask=offs_m < q_len)


_autotuned_kernel = triton.autotune(
    configs=fwd_configs(),
    key=["GROUP", "IS_CAUSAL", "BLOCK_M", "BLOCK_N", "TILE_N", "HEAD_DIM_PAD", "DOT_PRECISION"],
)(_block_sparse_fwd_kernel)


def block_sparse_fwd(q, k, v, counts, indices, block_m, block_n, causal, scale):
    """Launch the forward kernel.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` with unit last stride.
        counts: int32 ``[Bm, Hm, ceil(Lq / block_m)]`` with ``Bm in (1, B)``, ``Hm in (1, Hkv, Hq)``.
        indices: int32 ``[Bm, Hm, ceil(Lq / block_m), W]`` sorted key-block indices.
        block_m, block_n: the mask's block size (powers of two, 16..128).
        causal: bottom-right aligned causal masking on top of the block mask.
        scale: softmax scale.

    Returns:
        ``(o, lse)``: o ``[B, Hq, Lq, D]`` in q's dtype, lse ``[B, Hq, Lq]`` float32 (natural log).
    """
    batch, n_q_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    n_q_blocks = counts.shape[-1]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_q_heads, q_len), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    mask_heads = counts.shape[1]
    mask_head_div = 1 if mask_heads == n_q_heads else (n_q_heads // n_kv_heads if mask_heads == n_kv_heads else n_q_heads)
    grid = (n_q_blocks * batch * n_q_heads,)
    _autotuned_kernel[grid](
        q, k, v, o, lse, counts, indices,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        counts.stride(0) if counts.shape[0] > 1 else 0, counts.stride(1) if mask_heads > 1 else 0,
        indices.stride(0) if indices.shape[0] > 1 else 0, indices.stride(1) if mask_heads > 1 else 0,
        n_q_heads, q_len, kv_len, n_q_blocks, indices.shape[-1], scale * LOG2E,
        GROUP=n_q_heads // n_kv_heads, MASK_HEAD_DIV=mask_head_div, IS_CAUSAL=bool(causal),
        BLOCK_M=block_m, BLOCK_N=block_n,
        TILE_N=inner_tile(block_n, pow2_at_least(head_dim, 16), q.dtype),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=pow2_at_least(head_dim, 16),
        DOT_PRECISION=dot_precision(q.dtype),
    )
    return o, lse
