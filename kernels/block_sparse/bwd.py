"""Triton backward kernels for block-sparse attention and their launcher.

Three kernels, FlashAttention-2 style, all recomputing P from the forward's LSE:

1. ``_bwd_preprocess_kernel``: ``delta = rowsum(dO * O) - dLSE`` per query row.
2. ``_block_sparse_bwd_dkdv_kernel``: one program per (batch, kv head, key block). It walks
   the key-major (transposed) lists of the G query heads that share the kv head and
   accumulates dK and dV for its key block in registers. Every (key block, kv head) is
   owned by exactly one program, so dK/dV need no atomics and K/V are never repeated.
3. ``_block_sparse_bwd_dq_kernel``: one program per (batch, query head, query block),
   walking the query-major lists like the forward.

No kernel uses atomics and every reduction runs in a fixed order, so the backward is
deterministic (bitwise repeatable) by construction. Rows that saw no key (LSE = -inf)
get P = 0 and therefore zero gradients. In-tile masking runs only on tiles that cross
the causal diagonal or hold the ragged tail of the keys; the query tail needs no mask
because its rows load ``lse = +inf`` (so P = 0) and ``dO = 0``. With ``causal``, the
list entries that lie wholly on the invisible side of the diagonal (a suffix of a sorted
key-block list, a prefix of a sorted query-block list) are skipped before the loop.
Loads sit at loop top level, as in the forward, so Triton can pipeline them.
"""

import torch
import triton
import triton.language as tl

from .._common.attn_jit import key_bias, split_program
from .._common.bias import reduce_bias_grad
from .._common.config import (autotune_configs, check_fits, dkdv_passes, dot_precision, inner_tile, key_tile, launch,
                              pow2_at_least, pruner)
from .._common.predicates import NO_PREDICATES, band, band_bounds, range_table, segment_tables, words_per_row
from .._common.tile_jit import (finite_rows, packed_offsets, row_bounds, segment_bounds, tile_keep, tile_needs_mask,
                                visible_keys, visible_span)
from .fwd import _bstride, bias_table

LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["q_len"])
def _bwd_preprocess_kernel(
    o_ptr, do_ptr, dlse_ptr, delta_ptr,
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
    n_heads, q_len, n_q_blocks,
    HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    pid_m, pid_bh, b, h = split_program(tl.program_id(0), n_q_blocks, n_heads)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, HEAD_DIM_PAD)  # [D]
    io_mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)  # [BLOCK_M, D]
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + rows * stride_om + offs_d[None, :], mask=io_mask, other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + rows * stride_dom + offs_d[None, :],
                 mask=io_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # [BLOCK_M]
    row_ptrs = pid_bh.to(tl.int64) * q_len + offs_m
    if HAS_DLSE:
        # d lse / d s = P, so a gradient on lse folds into delta: dS = P * (dP - (delta - dlse))
        delta -= tl.load(dlse_ptr + row_ptrs, mask=offs_m < q_len, other=0.0)
    tl.store(delta_ptr + row_ptrs, delta, mask=offs_m < q_len)


@triton.jit
def _load_row_stats(lse_ptr, delta_ptr, offs, valid):
    """lse in the log2 domain with -inf (row saw no key) and invalid rows mapped to +inf, so P = 0."""
    lse = tl.load(lse_ptr + offs, mask=valid, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(delta_ptr + offs, mask=valid, other=0.0)
    return lse, delta


@triton.jit(do_not_specialize=["q_len", "kv_len", "n_k_blocks", "width_t", "left", "right"])
def _block_sparse_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, counts_t_ptr, indices_t_ptr, slots_t_ptr,
    words_ptr, ranges_ptr, cu_q_ptr, cu_k_ptr, q_seg_ptr, kv_seg_ptr, q_segb_ptr, k_segb_ptr, bias_ptr, dbias_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh, stride_cb, stride_ch, stride_ib, stride_ih, stride_sq, stride_sk, stride_sbq, stride_sbk,
    stride_bb, stride_bh, stride_dbb, stride_dbh,
    n_kv_heads, q_len, kv_len, n_k_blocks, width_t, qk_scale, scale, left, right,
    GROUP: tl.constexpr, MASK_HEAD_DIV: tl.constexpr, HAS_BAND: tl.constexpr, HAS_RANGE: tl.constexpr,
    HAS_SEG: tl.constexpr, HAS_BITS: tl.constexpr, VARLEN: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_M: tl.constexpr, KEY_TILE: tl.constexpr,
    WORDS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PASS: tl.constexpr,
):
    # 1-D grid, key slice fastest: programs running together read the Q/dO of one head. A mask key block runs
    # as BLOCK_N // KEY_TILE programs, each owning KEY_TILE key rows (its dK/dV accumulators fit registers).
    # PASS 0 accumulates dK and dV; PASS 1 only dK and PASS 2 only dV (two launches with one accumulator each,
    # for head dims whose fused pass spills registers; each accumulator sees the same operations either way).
    n_slices = n_k_blocks * (BLOCK_N // KEY_TILE)
    pid_s, _, b, h_kv = split_program(tl.program_id(0), n_slices, n_kv_heads)
    pid_n = pid_s // (BLOCK_N // KEY_TILE)  # the mask key block
    q_start, q_end, kv_start, kv_end, shift = row_bounds(ranges_ptr, b, q_len, kv_len, HAS_RANGE)
    q_tok, k_tok = packed_offsets(cu_q_ptr, cu_k_ptr, b, VARLEN)  # packed layout: the sequence's first rows

    block_n0 = pid_n * BLOCK_N  # first key of the mask block (bit masks are per block)
    start_n = pid_s * KEY_TILE  # first key of this program
    offs_n = start_n + tl.arange(0, KEY_TILE)  # [KEY_TILE]
    offs_d = tl.arange(0, HEAD_DIM_PAD)  # [D]
    offs_t = tl.arange(0, TILE_M)  # [TILE_M]
    rows_n = (k_tok + offs_n[:, None]).to(tl.int64)
    kv_valid = (offs_n >= kv_start) & (offs_n < kv_end)  # [KEY_TILE]
    kv_mask = kv_valid[:, None] & (offs_d[None, :] < HEAD_DIM)  # [KEY_TILE, D]
    k = tl.load(k_ptr + b * stride_kb + h_kv * stride_kh + rows_n * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)  # [KEY_TILE, D]
    v = tl.load(v_ptr + b * stride_vb + h_kv * stride_vh + rows_n * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)  # [KEY_TILE, D]
    dk = tl.zeros([KEY_TILE, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([KEY_TILE, HEAD_DIM_PAD], dtype=tl.float32)

    # the valid keys of this slice and the queries that can see them (band: -left <= j - (i + shift) <= right)
    first_k = tl.maximum(start_n, kv_start)
    last_k = tl.minimum(start_n + KEY_TILE, kv_end) - 1
    lo_q = q_start
    hi_q = q_end - 1
    if HAS_BAND:
        lo_q = tl.maximum(lo_q, first_k - shift - right)
        hi_q = tl.minimum(hi_q, last_k - shift + left)
    k_lo, k_hi = segment_bounds(k_segb_ptr + b * stride_sbk, pid_n, HAS_SEG)
    col = pid_n.to(tl.int64)
    store = offs_n < kv_len
    if VARLEN:
        store = kv_valid  # rows past the sequence belong to the next one
    for g in range(0, GROUP):
        h = h_kv * GROUP + g  # query head
        h_mask = h // MASK_HEAD_DIV
        kbias = tl.zeros([KEY_TILE], dtype=tl.float32)
        if HAS_BIAS:
            kbias = key_bias(bias_ptr + b * stride_bb + h * stride_bh, offs_n, kv_start, kv_end)  # [KEY_TILE]
        db = tl.zeros([KEY_TILE], dtype=tl.float32)  # d key_bias of this head: sum over queries of dS
        count = tl.load(counts_t_ptr + b * stride_cb + h_mask * stride_ch + col)
        idx_row = indices_t_ptr + b * stride_ib + h_mask * stride_ih + col * width_t
        slot_row = slots_t_ptr + b * stride_ib + h_mask * stride_ih + col * width_t
        # sorted lists: the query blocks wholly outside [lo_q, hi_q] are a prefix and a suffix; skip them
        first, count = visible_span(idx_row, count, lo_q, hi_q, first_k, last_k, BLOCK_M, HAS_BAND or HAS_RANGE)
        q_base = q_ptr + b * stride_qb + h * stride_qh + q_tok * stride_qm + offs_d[None, :]
        do_base = do_ptr + b * stride_dob + h * stride_doh + q_tok * stride_dom + offs_d[None, :]
        row_base = b * stride_lb + h * stride_lh + q_tok  # lse / delta rows of this head
        for it in range(first, count):
            qb = tl.load(idx_row + it)  # token indices stay int32; pointer offsets are int64
            slot = it * 0 - 1
            if HAS_BITS:
                slot = tl.load(slot_row + it)
            seg_lo, seg_hi = segment_bounds(q_segb_ptr + b * stride_sbq, qb, HAS_SEG)
            for sub in tl.static_range(BLOCK_M // TILE_M):
                start_m = qb * BLOCK_M + sub * TILE_M
                offs_m = start_m + offs_t  # [TILE_M]
                q_ok = (offs_m >= q_start) & (offs_m < q_end)  # [TILE_M]
                io_mask = q_ok[:, None] & (offs_d[None, :] < HEAD_DIM)  # [TILE_M, D]
                q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm, mask=io_mask, other=0.0)  # [TILE_M, D]
                do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_dom, mask=io_mask, other=0.0)  # [TM, D]
                lse, delta = _load_row_stats(lse_ptr + row_base, delta_ptr + row_base, offs_m, q_ok)  # [TILE_M]
                # -- recompute P^T (log2 domain) ----
                qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [KEY_TILE, TILE_M]
                if HAS_BIAS:
                    qk_t += kbias[:, None]
                p_t = tl.math.exp2(qk_t - lse[None, :])  # [KEY_TILE, TILE_M]
                # -- predicates only on partial tiles (query rows outside their range already have P = 0) ----
                needs_mask = tile_needs_mask(start_m, start_n, kv_start, kv_end, shift, left, right, seg_lo, seg_hi,
                                             k_lo, k_hi, slot, TILE_M, KEY_TILE, HAS_BAND, HAS_SEG, HAS_BITS)
                if needs_mask:
                    q_seg = offs_m * 0
                    if HAS_SEG:
                        q_seg = tl.load(q_seg_ptr + b * stride_sq + offs_m, mask=offs_m < q_len, other=-2)
                    keep = tile_keep(offs_m[None, :], offs_n[:, None], kv_start, kv_end, shift, left, right,
                                     q_seg[None, :], kv_seg_ptr + b * stride_sk, words_ptr, slot, qb * BLOCK_M,
                                     block_n0, HAS_BAND, HAS_SEG, HAS_BITS, BLOCK_M, WORDS)  # [KEY_TILE, TILE_M]
                    p_t = tl.where(keep, p_t, 0.0)
                    # queries and output gradients reach dK/dV only through pairs the tile keeps
                    if PASS != 2:
                        q = tl.where(finite_rows(q)[:, None] != 0, q, 0.0)
                    do = tl.where(finite_rows(do)[:, None] != 0, do, 0.0)
                # -- dV += P^T dO ; dS^T = P^T * (dP^T - delta) ; dK += dS^T Q ----
                if PASS != 1:
                    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)  # [KEY_TILE, D]
                if PASS != 2:
                    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [KEY_TILE, TILE_M]
                    ds_t = p_t * (dp_t - delta[None, :])  # [KEY_TILE, TILE_M]
                    if needs_mask:
                        ds_t = tl.where(p_t == 0.0, 0.0, ds_t)
                    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)  # [KEY_TILE, D]
                    if HAS_BIAS:
                        db += tl.sum(ds_t, 1)
        if HAS_BIAS:
            if PASS != 2:  # every (batch, query head, key) of the slice is written, 0 where no query attended
                tl.store(dbias_ptr + b * stride_dbb + h * stride_dbh + offs_n, db, mask=store)

    # -- epilogue: every key row of the slice is written, zeros where no query attended ----
    dk = dk * scale
    st_mask = store[:, None] & (offs_d[None, :] < HEAD_DIM)
    if PASS != 2:
        tl.store(dk_ptr + b * stride_dkb + h_kv * stride_dkh + rows_n * stride_dkn + offs_d[None, :],
                 dk.to(dk_ptr.dtype.element_ty), mask=st_mask)
    if PASS != 1:
        tl.store(dv_ptr + b * stride_dvb + h_kv * stride_dvh + rows_n * stride_dvn + offs_d[None, :],
                 dv.to(dv_ptr.dtype.element_ty), mask=st_mask)


@triton.jit(do_not_specialize=["q_len", "kv_len", "n_q_blocks", "width", "left", "right"])
def _block_sparse_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, counts_ptr, indices_ptr, slots_ptr,
    words_ptr, ranges_ptr, cu_q_ptr, cu_k_ptr, q_seg_ptr, kv_seg_ptr, q_segb_ptr, k_segb_ptr, bias_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    stride_lb, stride_lh, stride_cb, stride_ch, stride_ib, stride_ih, stride_sq, stride_sk, stride_sbq, stride_sbk,
    stride_bb, stride_bh,
    n_q_heads, q_len, kv_len, n_q_blocks, width, qk_scale, scale, left, right,
    GROUP: tl.constexpr, MASK_HEAD_DIV: tl.constexpr, HAS_BAND: tl.constexpr, HAS_RANGE: tl.constexpr,
    HAS_SEG: tl.constexpr, HAS_BITS: tl.constexpr, VARLEN: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_N: tl.constexpr, WORDS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # 1-D grid, query block fastest (as the forward).
    pid_m, _, b, h = split_program(tl.program_id(0), n_q_blocks, n_q_heads)
    h_kv = h // GROUP
    h_mask = h // MASK_HEAD_DIV
    q_start, q_end, kv_start, kv_end, shift = row_bounds(ranges_ptr, b, q_len, kv_len, HAS_RANGE)
    q_tok, k_tok = packed_offsets(cu_q_ptr, cu_k_ptr, b, VARLEN)  # packed layout: the sequence's first rows

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, HEAD_DIM_PAD)  # [D]
    offs_t = tl.arange(0, TILE_N)  # [TILE_N]
    rows_m = (q_tok + offs_m[:, None]).to(tl.int64)
    q_valid = (offs_m >= q_start) & (offs_m < q_end)  # [BLOCK_M]
    io_mask = q_valid[:, None] & (offs_d[None, :] < HEAD_DIM)  # [BLOCK_M, D]
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows_m * stride_qm + offs_d[None, :],
                mask=io_mask, other=0.0)  # [BLOCK_M, D]
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + rows_m * stride_dom + offs_d[None, :],
                 mask=io_mask, other=0.0)  # [BLOCK_M, D]
    row_base = b * stride_lb + h * stride_lh + q_tok
    lse, delta = _load_row_stats(lse_ptr + row_base, delta_ptr + row_base, offs_m, q_valid)  # [BLOCK_M]
    k_base = k_ptr + b * stride_kb + h_kv * stride_kh + k_tok * stride_kn + offs_d[None, :]
    v_base = v_ptr + b * stride_vb + h_kv * stride_vh + k_tok * stride_vn + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    first_q, last_q, lo_key, hi_key = visible_keys(m0, q_start, q_end, kv_start, kv_end, shift, left, right,
                                                   BLOCK_M, HAS_BAND)
    row = pid_m.to(tl.int64)
    count = tl.load(counts_ptr + b * stride_cb + h_mask * stride_ch + row)
    idx_row = indices_ptr + b * stride_ib + h_mask * stride_ih + row * width
    slot_row = slots_ptr + b * stride_ib + h_mask * stride_ih + row * width
    # sorted lists: the blocks wholly outside [lo_key, hi_key] are a prefix and a suffix; skip them
    first, count = visible_span(idx_row, count, lo_key, hi_key, first_q, last_q, BLOCK_N, HAS_BAND or HAS_RANGE)
    q_seg = offs_m * 0
    if HAS_SEG:
        q_seg = tl.load(q_seg_ptr + b * stride_sq + offs_m, mask=offs_m < q_len, other=-2)  # [BLOCK_M]
    seg_lo, seg_hi = segment_bounds(q_segb_ptr + b * stride_sbq, row, HAS_SEG)
    for it in range(first, count):
        kb = tl.load(idx_row + it)  # token indices stay int32; pointer offsets are int64
        slot = it * 0 - 1
        if HAS_BITS:
            slot = tl.load(slot_row + it)
        for sub in tl.static_range(BLOCK_N // TILE_N):
            start_n = kb * BLOCK_N + sub * TILE_N
            offs_n = start_n + offs_t  # [TILE_N]
            kv_mask = (offs_n[:, None] >= kv_start) & (offs_n[:, None] < kv_end) & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn, mask=kv_mask, other=0.0)  # [TILE_N, D]
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn, mask=kv_mask, other=0.0)  # [TILE_N, D]
            # -- recompute P (log2 domain) ----
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, TILE_N]
            if HAS_BIAS:
                qk += key_bias(bias_ptr + b * stride_bb + h * stride_bh, offs_n, kv_start, kv_end)[None, :]
            p = tl.math.exp2(qk - lse[:, None])  # [BLOCK_M, TILE_N]
            # -- predicates only on partial tiles (rows outside their range already have P = 0) ----
            k_lo, k_hi = segment_bounds(k_segb_ptr + b * stride_sbk, kb, HAS_SEG)
            needs_mask = tile_needs_mask(m0, start_n, kv_start, kv_end, shift, left, right, seg_lo, seg_hi,
                                         k_lo, k_hi, slot, BLOCK_M, TILE_N, HAS_BAND, HAS_SEG, HAS_BITS)
            if needs_mask:
                keep = tile_keep(offs_m[:, None], offs_n[None, :], kv_start, kv_end, shift, left, right,
                                 q_seg[:, None], kv_seg_ptr + b * stride_sk, words_ptr, slot, m0, kb * BLOCK_N,
                                 HAS_BAND, HAS_SEG, HAS_BITS, BLOCK_M, WORDS)  # [BLOCK_M, TILE_N]
                p = tl.where(keep, p, 0.0)
                # a key the tile excludes never reaches dQ: zero its non-finite values
                k = tl.where(finite_rows(k)[:, None] != 0, k, 0.0)
            # -- dS = P * (dO V^T - delta) ; dQ += dS K ----
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BLOCK_M, TILE_N]
            ds = p * (dp - delta[:, None])  # [BLOCK_M, TILE_N]
            if needs_mask:
                ds = tl.where(p == 0.0, 0.0, ds)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)  # [BLOCK_M, D]

    dq = dq * scale
    row_ok = offs_m < q_len
    if VARLEN:
        row_ok = q_valid
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + rows_m * stride_dqm + offs_d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


_KEY = ["GROUP", "HAS_BAND", "HAS_RANGE", "HAS_SEG", "HAS_BITS", "VARLEN", "HAS_BIAS", "BLOCK_M", "BLOCK_N", "HEAD_DIM_PAD",
        "DOT_PRECISION"]
_autotuned_dkdv = triton.autotune(configs=autotune_configs("dkdv"), key=_KEY + ["TILE_M", "KEY_TILE", "PASS"],
                                  prune_configs_by=pruner(lambda a: ("dkdv", "dk", "dv")[a["PASS"]]))(
    _block_sparse_bwd_dkdv_kernel)
_autotuned_dq = triton.autotune(configs=autotune_configs("dq"), key=_KEY + ["TILE_N"],
                                prune_configs_by=pruner("dq"))(_block_sparse_bwd_dq_kernel)


def _grad_like(x):
    """An uninitialized gradient buffer with x's strides when x is dense with unit last stride."""
    out = torch.empty_like(x)
    return out if out.stride(-1) == 1 else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _mask_strides(counts, indices, mask_heads):
    """Strides of the mask lists with broadcast dimensions (size 1) set to 0."""
    return (counts.stride(0) if counts.shape[0] > 1 else 0, counts.stride(1) if mask_heads > 1 else 0,
            indices.stride(0) if indices.shape[0] > 1 else 0, indices.stride(1) if mask_heads > 1 else 0)


def block_sparse_bwd(do, q, k, v, o, lse, counts, indices, counts_t, indices_t, block_m, block_n, causal, scale,
                     dlse=None, preds=NO_PREDICATES, varlen=None, key_bias=None):
    """Launch the backward kernels.

    Args:
        do: ``[B, Hq, Lq, D]`` gradient of the output, unit last stride (any other strides).
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``, unit last stride.
        o: ``[B, Hq, Lq, D]`` and lse: float32 ``[B, Hq, Lq]`` contiguous, from :func:`block_sparse_fwd`.
        counts, indices: the query-major lists of the forward, ``[Bm, Hm, NQB]`` / ``[Bm, Hm, NQB, W]``.
        counts_t, indices_t: the key-major lists, int32 ``[Bm, Hm, NKB]`` / ``[Bm, Hm, NKB, Wt]``
            (``BlockSparseMask.kv_major()``).
        block_m, block_n, causal, scale: as in the forward.
        dlse: optional float ``[B, Hq, Lq]`` gradient of lse.
        preds: the forward's predicates, with ``bit_slots_t`` (key-major slots) when it has bits.
        varlen: ``(cu_q, cu_k, max_q, max_k)`` as in the forward (packed q/k/v/o/do, lse ``[Hq, total_q]``).
        key_bias: the forward's ``[B|1, Hq|Hkv|1, Lk]`` key bias, or None.

    Returns:
        ``(dq, dk, dv)`` with the shapes, dtypes and (for dense inputs) strides of q, k, v; with ``key_bias``
        also ``dbias`` shaped and typed like it (the sum of dS over the queries, and over broadcast dims).

    Example:
        >>> o, lse = block_sparse_fwd(q, k, v, counts, indices, 64, 64, False, 0.125)
        >>> dq, dk, dv = block_sparse_bwd(torch.randn_like(o), q, k, v, o, lse, counts, indices,
        ...                               *mask.kv_major(), 64, 64, False, 0.125)
    """
    if varlen is None:
        batch, n_q_heads, q_len, head_dim = q.shape
        n_kv_heads, kv_len = k.shape[1], k.shape[2]
        strides = lambda x: x.stride()[:3]  # noqa: E731
        cu = None
    else:
        cu_q, cu_k, q_len, kv_len = varlen
        batch = cu_q.shape[0] - 1
        n_q_heads, head_dim, n_kv_heads = q.shape[1], q.shape[2], k.shape[1]
        strides = lambda x: (0, x.stride(1), x.stride(0))  # noqa: E731
        cu = (cu_q.to(torch.int32).contiguous(), cu_k.to(torch.int32).contiguous())
    if key_bias is not None and varlen is not None:
        raise ValueError("key_bias is not supported with packed (varlen) sequences; got both.")
    dq, dk, dv = _grad_like(q), _grad_like(k), _grad_like(v)
    if q.numel() == 0 or k.numel() == 0 or batch == 0:
        grads = (dq.zero_(), dk.zero_(), dv.zero_())
        return grads if key_bias is None else grads + (torch.zeros_like(key_bias),)
    n_q_blocks, n_k_blocks = counts.shape[-1], counts_t.shape[-1]
    mask_heads = counts.shape[1]
    group = n_q_heads // n_kv_heads
    mask_head_div = 1 if mask_heads == n_q_heads else (group if mask_heads == n_kv_heads else n_q_heads)
    head_dim_pad = pow2_at_least(head_dim, 16)
    passes = dkdv_passes(q.dtype, head_dim_pad)
    for kernel in [name for name, _ in passes] + ["dq"]:
        check_fits(kernel, q, block_m, block_n, head_dim_pad)
    precision = dot_precision(q.dtype)
    lse = lse.contiguous()

    # -- delta = rowsum(dO * O) - dlse ----
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    if cu is None:
        delta = torch.empty((batch, n_q_heads, q_len), dtype=torch.float32, device=q.device)
        pre_m = 64
        n_pre = triton.cdiv(q_len, pre_m)
        _bwd_preprocess_kernel[(n_pre * batch * n_q_heads,)](
            o, do, dlse if dlse is not None else delta, delta,
            o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
            n_q_heads, q_len, n_pre,
            HAS_DLSE=dlse is not None, BLOCK_M=pre_m, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        )
        ls = lse.stride()[:2]
    else:  # packed rows: delta [Hq, total_q] like lse
        delta = (o.float() * do.float()).sum(-1).transpose(0, 1).contiguous()
        if dlse is not None:
            delta = delta - dlse
        ls = (0, lse.stride(0))

    left, right = band(causal, preds.window)
    bl, br = band_bounds(left, right)
    ranges = range_table(preds, batch, q_len, kv_len, q.device, cu)
    q_seg, kv_seg, q_segb, k_segb = segment_tables(preds, block_m, block_n)
    slots = slots_t = None
    if preds.bit_slots is not None:
        if preds.bit_slots_t is None:
            raise ValueError("preds.bit_slots_t (the key-major bit slots) is needed for the backward of a mask "
                             "with bit-masked tiles, got None.")
        slots = preds.bit_slots.to(torch.int32).expand(indices.shape).contiguous()
        slots_t = preds.bit_slots_t.to(torch.int32).expand(indices_t.shape).contiguous()
    dummy = counts
    bias, bias_sb, bias_sh = bias_table(key_bias, batch, n_q_heads, kv_len, dummy)
    dbias = dummy
    if key_bias is not None:
        dbias = torch.empty((batch, n_q_heads, kv_len), dtype=torch.float32, device=q.device)
    tables = (dummy if preds.bit_words is None else preds.bit_words, dummy if ranges is None else ranges,
              dummy if cu is None else cu[0], dummy if cu is None else cu[1],
              dummy if q_seg is None else q_seg, dummy if kv_seg is None else kv_seg,
              dummy if q_segb is None else q_segb, dummy if k_segb is None else k_segb)
    seg_strides = (_bstride(q_seg), _bstride(kv_seg), _bstride(q_segb), _bstride(k_segb))
    common = dict(GROUP=group, MASK_HEAD_DIV=mask_head_div, HAS_BAND=left >= 0 or right >= 0,
                  HAS_RANGE=ranges is not None, HAS_SEG=q_seg is not None, HAS_BITS=slots is not None,
                  VARLEN=cu is not None, HAS_BIAS=key_bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, WORDS=words_per_row(block_n),
                  HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, DOT_PRECISION=precision)
    qk_scale = scale * LOG2E
    tile_k = key_tile(block_n, head_dim_pad, q.dtype)
    grid_dkdv = (n_k_blocks * (block_n // tile_k) * batch * n_kv_heads,)  # one program per key slice
    args_dkdv = (q, k, v, do, lse, delta, dk, dv, counts_t, indices_t, dummy if slots_t is None else slots_t,
                 *tables, bias, dbias, *strides(q), *strides(k), *strides(v), *strides(do), *strides(dk),
                 *strides(dv), *ls, *_mask_strides(counts_t, indices_t, mask_heads), *seg_strides, bias_sb, bias_sh,
                 n_q_heads * kv_len, kv_len,
                 n_kv_heads, q_len, kv_len, n_k_blocks, indices_t.shape[-1], qk_scale, scale, bl, br)
    for name, which in passes:
        launch(_autotuned_dkdv, _block_sparse_bwd_dkdv_kernel, name, grid_dkdv, args_dkdv,
               dict(TILE_M=inner_tile(block_m, head_dim_pad, q.dtype), KEY_TILE=tile_k, PASS=which, **common),
               q.dtype, block_m, block_n)
    launch(_autotuned_dq, _block_sparse_bwd_dq_kernel, "dq", (n_q_blocks * batch * n_q_heads,),
           (q, k, v, do, lse, delta, dq, counts, indices, dummy if slots is None else slots, *tables, bias,
            *strides(q), *strides(k), *strides(v), *strides(do), *strides(dq), *ls,
            *_mask_strides(counts, indices, mask_heads), *seg_strides, bias_sb, bias_sh,
            n_q_heads, q_len, kv_len, n_q_blocks, indices.shape[-1], qk_scale, scale, bl, br),
           dict(TILE_N=inner_tile(block_n, head_dim_pad, q.dtype), **common), q.dtype, block_m, block_n)
    if key_bias is None:
        return dq, dk, dv
    return dq, dk, dv, reduce_bias_grad(dbias, key_bias)
