"""Triton backward kernels for stripe-sparse attention (dQ, dK, dV), deterministic and race-free.

The backward splits the kept pairs differently from the forward so that every key has one writer:

* ``dQ`` (query-major, one program per query block): the forward's split, block part with
  in-tile ``slash | column`` masking plus the gathered columns; each program owns its rows.
* ``dK/dV`` of the block part (key-major, one program per (batch, kv head, key block)): the
  transposed block lists; a pair is taken iff it lies on a slash and its key is *not* a vertical
  column. The program loops over the query heads of its GQA group and stores the whole key block.
* ``dK/dV`` of the columns (one program per (batch, kv head, tile of the sorted unique vertical
  list)): every query row sees a vertical column, so the program scans all query blocks and
  adds into the rows the previous launch stored. Columns are unique within a list, so no two
  programs of one launch touch one row; per-query-head lists (``Hm = Hq`` with GQA) run one
  launch per head of the group, in order.

Rows ``i`` use the saved ``lse`` (natural log; ``-inf`` rows give ``p = 0``) and
``delta_i = sum_d o_id * do_id``.
"""

import torch
import triton
import triton.language as tl

from .._common.attn_jit import load_rows, split_program
from .._common.tile_jit import finite_rows, list_span
from .._common.config import (autotune_configs, check_fits, dot_precision, launch, launch_config, pow2_at_least,
                              pruner, stripe_dkv_passes, stripe_tiles)
from .fwd import _mask_head_div, block_list

LOG2E = 1.4426950408889634


@triton.jit
def _dq_step(dq, q, do, k, v, lse2, delta, keep, qk_scale, DOT_PRECISION: tl.constexpr):
    """dq += dS @ K for one [BLOCK_M, N] tile (dS in natural units, unscaled)."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, N]
    p = tl.where(keep, tl.math.exp2(qk - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BLOCK_M, N]
    ds = tl.where(keep, p * (dp - delta[:, None]), 0.0)
    k = tl.where(finite_rows(k)[:, None] != 0, k, 0.0)  # an excluded key never reaches dQ
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit
def _dkv_step(dk, dv, q, do, k, v, lse2, delta, keep, qk_scale, DOT_PRECISION: tl.constexpr, PASS: tl.constexpr):
    """dv += P^T @ dO and dk += dS^T @ Q for one [BLOCK_M, N] tile (PASS 1: dk only, 2: dv only, 0: both)."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, N]
    p = tl.where(keep, tl.math.exp2(qk - lse2[:, None]), 0.0)
    # queries and output gradients reach dK/dV only through the pairs the tile keeps
    if PASS != 1:
        do_safe = tl.where(finite_rows(do)[:, None] != 0, do, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do_safe, input_precision=DOT_PRECISION)  # [N, D]
    if PASS != 2:
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BLOCK_M, N]
        ds = tl.where(keep, p * (dp - delta[:, None]), 0.0)
        q = tl.where(finite_rows(q)[:, None] != 0, q, 0.0)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)  # [N, D]
    return dk, dv


@triton.jit
def _load_q_do_stats(q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, offs_m, offs_d, q_len, n_q_heads,
                     stride_qb, stride_qh, stride_qm, stride_db, stride_dh, stride_dm, HEAD_DIM: tl.constexpr):
    """q, do ``[BLOCK_M, D]``, lse (log2 units, 0 on empty rows) and delta ``[BLOCK_M]`` of one query block."""
    row_ok = offs_m < q_len
    q = load_rows(q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, row_ok, stride_qm, HEAD_DIM)
    do = load_rows(do_ptr + b * stride_db + h * stride_dh, offs_m, offs_d, row_ok, stride_dm, HEAD_DIM)
    row_id = (b * n_q_heads + h) * q_len + offs_m
    lse = tl.load(lse_ptr + row_id, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    delta = tl.load(delta_ptr + row_id, mask=row_ok, other=0.0)
    return q, do, lse2, delta


@triton.jit(do_not_specialize=["q_len", "kv_len", "n_q_blocks", "width", "col_width", "mask_b_stride"])
def _stripe_sparse_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    bcount_ptr, bindex_ptr, ccount_ptr, cindex_ptr, diag_ptr, vert_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dm, stride_gb, stride_gh, stride_gm,
    n_q_heads, q_len, kv_len, n_q_blocks, width, col_width, mask_b_stride, qk_scale, scale,
    GROUP: tl.constexpr, MASK_HEAD_DIV: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_N: tl.constexpr, TILE_C: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m, _, b, h = split_program(tl.program_id(0), n_q_blocks, n_q_heads)
    mrow = b * mask_b_stride + h // MASK_HEAD_DIV
    row = mrow * n_q_blocks + pid_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d[None, :] < HEAD_DIM
    q, do, lse2, delta = _load_q_do_stats(q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, offs_m, offs_d, q_len, n_q_heads,
                                    stride_qb, stride_qh, stride_qm, stride_db, stride_dh, stride_dm, HEAD_DIM)
    k_base = k_ptr + b * stride_kb + (h // GROUP) * stride_kh + offs_d[None, :]
    v_base = v_ptr + b * stride_vb + (h // GROUP) * stride_vh + offs_d[None, :]
    diag_row = diag_ptr + mrow * (q_len + kv_len - 1) + (kv_len - 1)
    vert_row = vert_ptr + mrow * kv_len
    causal_shift = kv_len - q_len
    row_ok = offs_m[:, None] < q_len
    kb_limit = kv_len - 1
    if IS_CAUSAL:
        kb_limit = pid_m * BLOCK_M + BLOCK_M - 1 + causal_shift
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    # -- block part: pairs on a slash or on a vertical column ----
    # loop bounds before the loops, loads at loop top level (pipelined); hidden pairs are masked, not branched
    idx_row, count = block_list(bindex_ptr, bcount_ptr, row, width, kb_limit, IS_CAUSAL, BLOCK_N)
    for it in range(0, count):
        kb = tl.load(idx_row + it).to(tl.int64)
        for sub in tl.static_range(BLOCK_N // TILE_N):
            start_n = kb * BLOCK_N + sub * TILE_N
            offs_n = start_n + tl.arange(0, TILE_N)  # [TILE_N]
            col_ok = offs_n < kv_len
            k = tl.load(k_base + offs_n[:, None] * stride_kn, mask=col_ok[:, None] & d_ok, other=0.0)  # [TILE_N, D]
            v = tl.load(v_base + offs_n[:, None] * stride_vn, mask=col_ok[:, None] & d_ok, other=0.0)  # [TILE_N, D]
            pair_ok = row_ok & col_ok[None, :]  # [BLOCK_M, TILE_N]
            on_slash = tl.load(diag_row + (offs_m[:, None] - offs_n[None, :]), mask=pair_ok, other=0)
            on_col = tl.load(vert_row + offs_n, mask=col_ok, other=0)
            keep = pair_ok & ((on_slash != 0) | (on_col[None, :] != 0))
            if IS_CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
            dq = _dq_step(dq, q, do, k, v, lse2, delta, keep, qk_scale, DOT_PRECISION)

    # -- column part: vertical columns outside the block part ----
    col_row = cindex_ptr + row * col_width
    col_count = tl.load(ccount_ptr + row)
    if IS_CAUSAL:  # sorted: the columns no query of the block sees are a suffix
        _, col_count = list_span(col_row, col_count, 0, kb_limit, 1)
    for c0 in range(0, col_count, TILE_C):
        offs_c = c0 + tl.arange(0, TILE_C)  # [TILE_C]
        c_ok = offs_c < col_count
        cols = tl.load(col_row + offs_c, mask=c_ok, other=0).to(tl.int64)
        k = tl.load(k_base + cols[:, None] * stride_kn, mask=c_ok[:, None] & d_ok, other=0.0)  # [TILE_C, D]
        v = tl.load(v_base + cols[:, None] * stride_vn, mask=c_ok[:, None] & d_ok, other=0.0)  # [TILE_C, D]
        keep = row_ok & c_ok[None, :]  # [BLOCK_M, TILE_C]
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + causal_shift)
        dq = _dq_step(dq, q, do, k, v, lse2, delta, keep, qk_scale, DOT_PRECISION)

    dq_ptrs = dq_ptr + b * stride_gb + h * stride_gh + offs_m[:, None].to(tl.int64) * stride_gm + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok & d_ok)


@triton.jit(do_not_specialize=["q_len", "kv_len", "n_k_blocks", "width_t", "mask_b_stride"])
def _stripe_sparse_bwd_dkv_block_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    tcount_ptr, tindex_ptr, diag_ptr, vert_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dm,
    n_q_heads, n_kv_heads, q_len, kv_len, n_k_blocks, width_t, mask_b_stride, qk_scale, scale,
    GROUP: tl.constexpr, MASK_HEAD_DIV: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_N: tl.constexpr, SUB_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, PASS: tl.constexpr,
):
    # one program per TILE_N slice of a key block (key slice fastest)
    n_sub = BLOCK_N // TILE_N
    pid_s, pid_bh, b, h_kv = split_program(tl.program_id(0), n_k_blocks * n_sub, n_kv_heads)
    pid_n = pid_s // n_sub
    start_n = pid_s * TILE_N
    offs_n = start_n + tl.arange(0, TILE_N)  # [TILE_N]
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    col_ok = offs_n < kv_len
    kv_mask = col_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows_n = offs_n[:, None].to(tl.int64)
    k = tl.load(k_ptr + b * stride_kb + h_kv * stride_kh + rows_n * stride_kn + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(v_ptr + b * stride_vb + h_kv * stride_vh + rows_n * stride_vn + offs_d[None, :], mask=kv_mask,
                other=0.0)
    causal_shift = kv_len - q_len
    dk = tl.zeros([TILE_N, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([TILE_N, HEAD_DIM_PAD], dtype=tl.float32)
    for g in range(0, GROUP):
        h = h_kv * GROUP + g
        mrow = b * mask_b_stride + h // MASK_HEAD_DIV
        trow = mrow * n_k_blocks + pid_n
        diag_row = diag_ptr + mrow * (q_len + kv_len - 1) + (kv_len - 1)
        not_col = tl.load(vert_ptr + mrow * kv_len + offs_n, mask=col_ok, other=1) == 0  # [TILE_N]
        t_row = tindex_ptr + trow * width_t
        first = tl.zeros([], dtype=tl.int32)
        count = tl.load(tcount_ptr + trow)
        if IS_CAUSAL:  # sorted: the query blocks wholly before the diagonal of this key slice are a prefix
            first, count = list_span(t_row, count, start_n - causal_shift, q_len, BLOCK_M)
        for it in range(first, count):
            m = tl.load(t_row + it)
            for sm in tl.static_range(BLOCK_M // SUB_M):  # query block in SUB_M-row slices; hidden pairs masked
                offs_m = m * BLOCK_M + sm * SUB_M + tl.arange(0, SUB_M)  # [SUB_M]
                q, do, lse2, delta = _load_q_do_stats(q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, offs_m, offs_d, q_len,
                                                n_q_heads, stride_qb, stride_qh, stride_qm, stride_db,
                                                stride_dh, stride_dm, HEAD_DIM)
                pair_ok = (offs_m[:, None] < q_len) & col_ok[None, :]  # [SUB_M, TILE_N]
                on_slash = tl.load(diag_row + (offs_m[:, None] - offs_n[None, :]), mask=pair_ok, other=0)
                keep = pair_ok & (on_slash != 0) & not_col[None, :]  # columns belong to the column pass
                if IS_CAUSAL:
                    keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
                dk, dv = _dkv_step(dk, dv, q, do, k, v, lse2, delta, keep, qk_scale, DOT_PRECISION, PASS)
    out = pid_bh.to(tl.int64) * kv_len * HEAD_DIM + rows_n * HEAD_DIM + offs_d[None, :]  # dense fp32 [B, Hkv, Lk, D]
    if PASS != 2:
        tl.store(dk_ptr + out, dk * scale, mask=kv_mask)
    if PASS != 1:
        tl.store(dv_ptr + out, dv, mask=kv_mask)


@triton.jit(do_not_specialize=["q_len", "kv_len", "n_q_blocks", "n_col_tiles", "vert_width", "mask_b_stride",
                               "g_start"])
def _stripe_sparse_bwd_dkv_col_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, vcount_ptr, vindex_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dm,
    n_q_heads, n_kv_heads, q_len, kv_len, n_q_blocks, n_col_tiles, vert_width, mask_b_stride, g_start, qk_scale,
    scale, GROUP: tl.constexpr, G_LOOP: tl.constexpr, MASK_HEAD_DIV: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, TILE_C: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, PASS: tl.constexpr,
):
    pid_t, pid_bh, b, h_kv = split_program(tl.program_id(0), n_col_tiles, n_kv_heads)
    mrow = b * mask_b_stride + (h_kv * GROUP + g_start) // MASK_HEAD_DIV  # one list for the G_LOOP heads
    v_count = tl.load(vcount_ptr + mrow)
    c0 = pid_t * TILE_C
    if c0 < v_count:
        offs_c = c0 + tl.arange(0, TILE_C)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        c_ok = offs_c < v_count
        cols = tl.load(vindex_ptr + mrow * vert_width + offs_c, mask=c_ok, other=0).to(tl.int64)  # [TILE_C]
        kv_mask = c_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_ptr + b * stride_kb + h_kv * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + b * stride_vb + h_kv * stride_vh + cols[:, None] * stride_vn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        causal_shift = kv_len - q_len
        first = tl.load(vindex_ptr + mrow * vert_width + c0)
        dk = tl.zeros([TILE_C, HEAD_DIM_PAD], dtype=tl.float32)
        dv = tl.zeros([TILE_C, HEAD_DIM_PAD], dtype=tl.float32)
        m_first = 0
        if IS_CAUSAL:  # the query blocks wholly before the first (smallest) column see none of the tile
            m_first = tl.maximum(first - causal_shift, 0) // BLOCK_M
        for g in range(0, G_LOOP):
            h = h_kv * GROUP + g_start + g
            for m in range(m_first, n_q_blocks):
                offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
                q, do, lse2, delta = _load_q_do_stats(q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, offs_m, offs_d, q_len,
                                                n_q_heads, stride_qb, stride_qh, stride_qm, stride_db,
                                                stride_dh, stride_dm, HEAD_DIM)
                keep = (offs_m[:, None] < q_len) & c_ok[None, :]  # [BLOCK_M, TILE_C]
                if IS_CAUSAL:
                    keep = keep & (cols[None, :] <= offs_m[:, None] + causal_shift)
                dk, dv = _dkv_step(dk, dv, q, do, k, v, lse2, delta, keep, qk_scale, DOT_PRECISION, PASS)
        out = pid_bh.to(tl.int64) * kv_len * HEAD_DIM + cols[:, None] * HEAD_DIM + offs_d[None, :]
        if PASS != 2:
            tl.store(dk_ptr + out, tl.load(dk_ptr + out, mask=kv_mask, other=0.0) + dk * scale, mask=kv_mask)
        if PASS != 1:
            tl.store(dv_ptr + out, tl.load(dv_ptr + out, mask=kv_mask, other=0.0) + dv, mask=kv_mask)


_dq_kernel = triton.autotune(configs=autotune_configs("st_dq"), key=["GROUP", "IS_CAUSAL", "BLOCK_M", "BLOCK_N",
                                                                    "TILE_N", "TILE_C", "HEAD_DIM_PAD",
                                                                    "DOT_PRECISION"],
                             prune_configs_by=pruner("st_dq"))(_stripe_sparse_bwd_dq_kernel)


def stripe_sparse_bwd(do, q, k, v, o, lse, lowered, kv_major, vertical, vertical_count, block_m, block_n, causal,
                      scale):
    """Gradients of :func:`stripe_sparse_fwd`.

    Args:
        do: ``[B, Hq, Lq, D]`` upstream gradient; q, k, v, o, lse: the forward's inputs and outputs.
        lowered: ``(block_counts, block_indices, block_full, col_counts, col_indices, diag_keep, col_keep)``.
        kv_major: ``(counts_t [Bm, Hm, NKB], indices_t [Bm, Hm, NKB, Wt])``, the block part transposed.
        vertical: int32 ``[Bm, Hm, NVw]`` sorted unique columns; vertical_count: int32 ``[Bm, Hm]``.
        block_m, block_n, causal, scale: as in the forward.

    Returns:
        ``(dq, dk, dv)`` in the dtypes and shapes of q, k, v. Deterministic (no atomics).
    """
    batch, n_q_heads, q_len, head_dim = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    group = n_q_heads // n_kv_heads
    block_counts, block_indices, _, col_counts, col_indices, diag_keep, col_keep = (x.contiguous() for x in lowered)
    counts_t, indices_t = (x.contiguous() for x in kv_major)
    vertical, vertical_count = vertical.contiguous(), vertical_count.contiguous()
    do = do if do.stride(-1) == 1 else do.contiguous()
    lse = lse.contiguous()
    delta = (o.float() * do.float()).sum(-1).contiguous()  # [B, Hq, Lq]
    dq = torch.empty_like(q)
    dk = torch.empty((batch, n_kv_heads, kv_len, head_dim), dtype=torch.float32, device=q.device)
    dv = torch.empty_like(dk)
    mask_batch, mask_heads, n_q_blocks = block_counts.shape
    n_k_blocks = counts_t.shape[-1]
    mask_b_stride = mask_heads if mask_batch > 1 else 0
    head_div = _mask_head_div(mask_heads, n_q_heads, n_kv_heads)
    qk_scale = scale * LOG2E
    common = dict(IS_CAUSAL=bool(causal), HEAD_DIM=head_dim, HEAD_DIM_PAD=pow2_at_least(head_dim, 16),
                  DOT_PRECISION=dot_precision(q.dtype))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    head_dim_pad = common["HEAD_DIM_PAD"]
    for kernel in ("st_dq", "st_dkv_block", "st_dkv_col"):  # the split passes need less than the fused one
        check_fits(kernel, q, block_m, block_n, head_dim_pad)
    tiles = stripe_tiles(block_m, block_n, head_dim, q.dtype)
    tile_c, tile_n, sub_m = tiles["tile_c"], tiles["tile_n"], tiles["sub_m"]
    launch(_dq_kernel, _stripe_sparse_bwd_dq_kernel, "st_dq", (n_q_blocks * batch * n_q_heads,),
           (q, k, v, do, lse, delta, dq, block_counts, block_indices, col_counts, col_indices, diag_keep, col_keep,
            *strides, dq.stride(0), dq.stride(1), dq.stride(2),
            n_q_heads, q_len, kv_len, n_q_blocks, block_indices.shape[-1], col_indices.shape[-1], mask_b_stride,
            qk_scale, scale),
           dict(GROUP=group, MASK_HEAD_DIV=head_div, BLOCK_M=block_m, BLOCK_N=block_n, TILE_N=tiles["q_tile_n"],
                TILE_C=tiles["dq_tile_c"], **common), q.dtype, block_m, block_n)
    # dK/dV: one fused pass, or a dK pass and a dV pass (fp16/bf16 at D >= 128, whose fused pass spills)
    passes = stripe_dkv_passes(q.dtype, head_dim_pad)
    for block_pass, _, which in passes:
        warps, stages = launch_config(block_pass, q.dtype, block_m, block_n, head_dim_pad)
        _stripe_sparse_bwd_dkv_block_kernel[(n_k_blocks * (block_n // tile_n) * batch * n_kv_heads,)](
            q, k, v, do, lse, delta, dk, dv, counts_t, indices_t, diag_keep, col_keep, *strides,
            n_q_heads, n_kv_heads, q_len, kv_len, n_k_blocks, indices_t.shape[-1], mask_b_stride, qk_scale, scale,
            GROUP=group, MASK_HEAD_DIV=head_div, BLOCK_M=block_m, BLOCK_N=block_n, TILE_N=tile_n,
            SUB_M=sub_m, PASS=which, num_warps=warps, num_stages=stages, **common)
    vert_width = vertical.shape[-1]
    if vert_width:
        n_col_tiles = triton.cdiv(vert_width, tile_c)
        col_block_m = tiles["col_m"]  # query tile of the column scan (free to choose)
        per_head = mask_heads == n_q_heads and group > 1  # each query head of a group has its own list
        for _, col_pass, which in passes:  # each pass adds into its own buffer, after the block pass stored it
            warps, stages = launch_config(col_pass, q.dtype, block_m, block_n, head_dim_pad)
            for g_start in (range(group) if per_head else (0,)):  # launches in order: no two writers per row
                _stripe_sparse_bwd_dkv_col_kernel[(n_col_tiles * batch * n_kv_heads,)](
                    q, k, v, do, lse, delta, dk, dv, vertical_count, vertical, *strides,
                    n_q_heads, n_kv_heads, q_len, kv_len, triton.cdiv(q_len, col_block_m), n_col_tiles, vert_width,
                    mask_b_stride, g_start, qk_scale, scale, GROUP=group, G_LOOP=1 if per_head else group,
                    MASK_HEAD_DIV=head_div, BLOCK_M=col_block_m, TILE_C=tile_c, PASS=which, num_warps=warps,
                    num_stages=stages, **common)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
