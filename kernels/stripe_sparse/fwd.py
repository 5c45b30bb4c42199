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

from .._common.config import autotune_configs, check_fits, dot_precision, launch, pow2_at_least, pruner, stripe_tiles
from .._common.attn_jit import drop_nonfinite, finish_rows, load_rows, online_update, split_program
from .._common.tile_jit import list_span

LOG2E = 1.4426950408889634


@triton.jit
def block_list(bindex_ptr, bcount_ptr, row, width, kb_limit, IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(idx_row, count)``: the block part's sorted key-block list of query-block row ``row``, without the blocks
    wholly past key ``kb_limit`` under causality (a suffix of the list)."""
    idx_row = bindex_ptr + row * width
    count = tl.load(bcount_ptr + row)
    if IS_CAUSAL:
        _, count = list_span(idx_row, count, 0, kb_limit, BLOCK_N)
    return idx_row, count


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
    pid_m, pid_bh, b, h = split_program(tl.program_id(0), n_q_blocks, n_q_heads)
    h_kv = h // GROUP
    mrow = b * mask_b_stride + h // MASK_HEAD_DIV  # flat (batch, head) row of the mask tensors
    row = mrow * n_q_blocks + pid_m  # flat (batch, head, query block) row

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, HEAD_DIM_PAD)  # [D]
    d_ok = offs_d[None, :] < HEAD_DIM  # [1, D]
    q = load_rows(q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, offs_m < q_len, stride_qm,
                  HEAD_DIM)  # [BLOCK_M, D]
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
    # The loop bounds are computed before the loops and the loads sit at loop top level, so Triton pipelines
    # them (num_stages); tiles that causality hides for some queries are masked, never branched around.
    idx_row, count = block_list(bindex_ptr, bcount_ptr, row, width, kb_limit, IS_CAUSAL, BLOCK_N)
    for it in range(0, count):
        kb = tl.load(idx_row + it).to(tl.int64)
        full = tl.load(bfull_ptr + row * width + it) != 0
        for sub in tl.static_range(BLOCK_N // TILE_N):
            start_n = kb * BLOCK_N + sub * TILE_N
            offs_n = start_n + tl.arange(0, TILE_N)  # [TILE_N]
            col_ok = offs_n[:, None] < kv_len  # [TILE_N, 1]
            k = tl.load(k_base + offs_n[:, None] * stride_kn, mask=col_ok & d_ok, other=0.0)  # [TILE_N, D]
            v = tl.load(v_base + offs_n[:, None] * stride_vn, mask=col_ok & d_ok, other=0.0)  # [TILE_N, D]
            # -- compute qk (log2 domain) ----
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, TILE_N]
            needs_mask = (full == 0) | (start_n + TILE_N > kv_len)
            if IS_CAUSAL:
                needs_mask = needs_mask | (start_n + TILE_N - 1 > pid_m * BLOCK_M + causal_shift)
            if needs_mask:  # in-tile masking: slash | column, key tail, causal
                pair_ok = row_ok & (offs_n[None, :] < kv_len)  # [BLOCK_M, TILE_N]
                on_slash = tl.load(diag_row + (offs_m[:, None] - offs_n[None, :]), mask=pair_ok, other=0)
                on_col = tl.load(vert_row + offs_n, mask=offs_n < kv_len, other=0)  # [TILE_N]
                keep = pair_ok & ((on_slash != 0) | (on_col[None, :] != 0))
                if IS_CAUSAL:
                    keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
                qk = tl.where(keep, qk, float("-inf"))
                v, bad = drop_nonfinite(v, keep, bad)
            acc, l_i, m_i = online_update(acc, l_i, m_i, qk, v, DOT_PRECISION)

    # -- column part: vertical columns outside the block part, gathered TILE_C at a time ----
    col_row = cindex_ptr + row * col_width
    col_count = tl.load(ccount_ptr + row)
    if IS_CAUSAL:  # sorted: the columns above the diagonal for every query of the block are a suffix
        _, col_count = list_span(col_row, col_count, 0, kb_limit, 1)
    for c0 in range(0, col_count, TILE_C):
        offs_c = c0 + tl.arange(0, TILE_C)  # [TILE_C]
        c_ok = offs_c < col_count
        cols = tl.load(col_row + offs_c, mask=c_ok, other=0).to(tl.int64)  # [TILE_C]
        k = tl.load(k_base + cols[:, None] * stride_kn, mask=c_ok[:, None] & d_ok, other=0.0)  # [TILE_C, D]
        v = tl.load(v_base + cols[:, None] * stride_vn, mask=c_ok[:, None] & d_ok, other=0.0)  # [TILE_C, D]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, TILE_C]
        keep = c_ok[None, :] & row_ok  # [BLOCK_M, TILE_C]
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + causal_shift)
        qk = tl.where(keep, qk, float("-inf"))
        v, bad = drop_nonfinite(v, keep, bad)
        acc, l_i, m_i = online_update(acc, l_i, m_i, qk, v, DOT_PRECISION)

    # -- epilogue: rows that saw no key give o = 0 and lse = -inf; a NaN row keeps NaN in both ----
    o, lse = finish_rows(acc, l_i, m_i, bad)  # [BLOCK_M, D], [BLOCK_M]
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :]
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=row_ok & d_ok)
    tl.store(lse_ptr + pid_bh.to(tl.int64) * q_len + offs_m, lse, mask=offs_m < q_len)


_autotuned_kernel = triton.autotune(
    configs=autotune_configs("st_fwd"),
    key=["GROUP", "IS_CAUSAL", "BLOCK_M", "BLOCK_N", "TILE_N", "TILE_C", "HEAD_DIM_PAD", "DOT_PRECISION"],
    prune_configs_by=pruner("st_fwd"),
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
    head_dim_pad = pow2_at_least(head_dim, 16)
    check_fits("st_fwd", q, block_m, block_n, head_dim_pad)
    tiles = stripe_tiles(block_m, block_n, head_dim, q.dtype)
    launch(_autotuned_kernel, _stripe_sparse_fwd_kernel, "st_fwd", (n_q_blocks * batch * n_q_heads,),
           (q, k, v, o, lse, *tensors,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            n_q_heads, q_len, kv_len, n_q_blocks, block_indices.shape[-1], col_indices.shape[-1],
            mask_heads if mask_batch > 1 else 0, scale * LOG2E),
           dict(GROUP=n_q_heads // n_kv_heads, MASK_HEAD_DIV=_mask_head_div(mask_heads, n_q_heads, n_kv_heads),
                IS_CAUSAL=bool(causal), BLOCK_M=block_m, BLOCK_N=block_n, TILE_N=tiles["q_tile_n"],
                TILE_C=tiles["tile_c"], HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
                DOT_PRECISION=dot_precision(q.dtype)),
           q.dtype, block_m, block_n)
    return o, lse
