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

from .._common.config import autotune_configs, check_fits, dot_precision, fwd_tile, launch, pow2_at_least, pruner
from .._common.predicates import NO_PREDICATES, band, band_bounds, range_table, segment_tables, words_per_row
from .._common.bias import bias_rows
from .._common.attn_jit import drop_nonfinite, finish_rows, key_bias, online_update, split_program
from .._common.tile_jit import (packed_offsets, row_bounds, segment_bounds, tile_keep, tile_needs_mask, visible_keys,
                                visible_span)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit(do_not_specialize=["q_len", "kv_len", "n_q_blocks", "width", "left", "right"])
def _block_sparse_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, counts_ptr, indices_ptr, slots_ptr, words_ptr, ranges_ptr,
    cu_q_ptr, cu_k_ptr, q_seg_ptr, kv_seg_ptr, q_segb_ptr, k_segb_ptr, bias_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
    stride_cb, stride_ch, stride_ib, stride_ih, stride_sq, stride_sk, stride_sbq, stride_sbk, stride_bb, stride_bh,
    n_q_heads, q_len, kv_len, n_q_blocks, width, qk_scale, left, right,
    GROUP: tl.constexpr, MASK_HEAD_DIV: tl.constexpr, HAS_BAND: tl.constexpr, HAS_RANGE: tl.constexpr,
    HAS_SEG: tl.constexpr, HAS_BITS: tl.constexpr, VARLEN: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_N: tl.constexpr, WORDS: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # 1-D grid (no 65535 limit on B*H): query block fastest, so programs that run
    # together share the K/V of one head in L2.
    pid_m, _, b, h = split_program(tl.program_id(0), n_q_blocks, n_q_heads)
    h_kv = h // GROUP
    h_mask = h // MASK_HEAD_DIV
    q_start, q_end, kv_start, kv_end, shift = row_bounds(ranges_ptr, b, q_len, kv_len, HAS_RANGE)
    q_tok, k_tok = packed_offsets(cu_q_ptr, cu_k_ptr, b, VARLEN)  # packed layout: the sequence's first rows

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, HEAD_DIM_PAD)  # [D]
    offs_t = tl.arange(0, TILE_N)  # [TILE_N]
    q_valid = (offs_m >= q_start) & (offs_m < q_end)  # [BLOCK_M]
    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + (q_tok + offs_m[:, None]) * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=q_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [BLOCK_M, D]
    k_base = k_ptr + b * stride_kb + h_kv * stride_kh + k_tok * stride_kn + offs_d[None, :]
    v_base = v_ptr + b * stride_vb + h_kv * stride_vh + k_tok * stride_vn + offs_d[None, :]
    bias_row = bias_ptr + b * stride_bb + h * stride_bh  # key_bias[b, h, :] (fp32, unit stride)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    bad = tl.zeros([BLOCK_M], dtype=tl.int32)  # rows that saw a non-finite value

    first_q, last_q, lo_key, hi_key = visible_keys(m0, q_start, q_end, kv_start, kv_end, shift, left, right,
                                                   BLOCK_M, HAS_BAND)
    row = pid_m.to(tl.int64)
    count = tl.load(counts_ptr + b * stride_cb + h_mask * stride_ch + row)
    idx_row = indices_ptr + b * stride_ib + h_mask * stride_ih + row * width
    slot_row = slots_ptr + b * stride_ib + h_mask * stride_ih + row * width
    # sorted lists: the blocks wholly outside [lo_key, hi_key] are a prefix and a suffix; skip them
    first, count = visible_span(idx_row, count, lo_key, hi_key, first_q, last_q, BLOCK_N, HAS_BAND or HAS_RANGE)
    rows_partial = (first_q > m0) | (last_q < tl.minimum(m0 + BLOCK_M, q_len) - 1)
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
            # -- compute qk (log2 domain) ----
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, TILE_N]
            if HAS_BIAS:
                qk += key_bias(bias_row, offs_n, kv_start, kv_end)[None, :]
            # -- predicates only on partial tiles: key edges, band edges, segment edges, bit masks ----
            k_lo, k_hi = segment_bounds(k_segb_ptr + b * stride_sbk, kb, HAS_SEG)
            needs_mask = tile_needs_mask(m0, start_n, kv_start, kv_end, shift, left, right, seg_lo, seg_hi,
                                         k_lo, k_hi, slot, BLOCK_M, TILE_N, HAS_BAND, HAS_SEG, HAS_BITS)
            if HAS_RANGE:
                needs_mask = needs_mask | rows_partial
            if needs_mask:
                keep = tile_keep(offs_m[:, None], offs_n[None, :], kv_start, kv_end, shift, left, right,
                                 q_seg[:, None], kv_seg_ptr + b * stride_sk, words_ptr, slot, m0, kb * BLOCK_N,
                                 HAS_BAND, HAS_SEG, HAS_BITS, BLOCK_M, WORDS)  # [BLOCK_M, TILE_N]
                qk = tl.where(keep, qk, float("-inf"))
                v, bad = drop_nonfinite(v, keep, bad)  # a key the tile excludes never reaches an output
            acc, l_i, m_i = online_update(acc, l_i, m_i, qk, v, DOT_PRECISION)  # [BLOCK_M, D]

    # -- epilogue: rows that saw no key give o = 0 and lse = -inf; a NaN row keeps NaN in both ----
    o, lse = finish_rows(acc, l_i, m_i, bad)  # [BLOCK_M, D], [BLOCK_M]
    o = tl.where(q_valid[:, None], o, 0.0)
    lse = tl.where(q_valid, lse, float("-inf"))
    row_ok = offs_m < q_len
    if VARLEN:
        row_ok = q_valid  # rows past the sequence belong to the next one
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + (q_tok + offs_m[:, None]) * stride_om + offs_d[None, :]
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    lse_ptrs = lse_ptr + b * stride_lb + h * stride_lh + q_tok + offs_m
    tl.store(lse_ptrs, lse, mask=row_ok)


_autotuned_kernel = triton.autotune(
    configs=autotune_configs("fwd"),
    key=["GROUP", "HAS_BAND", "HAS_RANGE", "HAS_SEG", "HAS_BITS", "VARLEN", "HAS_BIAS", "BLOCK_M", "BLOCK_N", "TILE_N",
         "HEAD_DIM_PAD", "DOT_PRECISION"],
    prune_configs_by=pruner("fwd"),
)(_block_sparse_fwd_kernel)


def _bstride(x):
    """Batch stride of a ``[B|1, ...]`` table (0 when broadcast or absent)."""
    return 0 if x is None or x.shape[0] == 1 else x.stride(0)


def bias_table(key_bias, batch, n_q_heads, kv_len, dummy):
    """``(table, stride_b, stride_h)``: ``key_bias [B|1, H|1, Lk]`` (H = Hq or Hkv) as a float32 view with one row
    per (batch, query head) and unit key stride (broadcast rows get stride 0); ``dummy`` and zeros when None."""
    if key_bias is None:
        return dummy, 0, 0
    bias = bias_rows(key_bias, batch, n_q_heads, kv_len)  # broadcast dims keep stride 0
    if bias.stride(-1) != 1:
        bias = bias.contiguous()
    return bias, bias.stride(0), bias.stride(1)


def block_sparse_fwd(q, k, v, counts, indices, block_m, block_n, causal, scale, preds=NO_PREDICATES,
                     varlen=None, key_bias=None):
    """Launch the forward kernel.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` with unit last stride.
        counts: int32 ``[Bm, Hm, ceil(Lq / block_m)]`` with ``Bm in (1, B)``, ``Hm in (1, Hkv, Hq)``.
        indices: int32 ``[Bm, Hm, ceil(Lq / block_m), W]`` sorted key-block indices.
        block_m, block_n: the mask's block size (powers of two, 16..128).
        causal: bottom-right aligned causal masking on top of the block mask.
        scale: softmax scale.
        preds: in-tile token predicates (:class:`~sparse_attn_kernels._common.predicates.TokenPredicates`).
        varlen: ``(cu_q, cu_k, max_q, max_k)`` for packed sequences: then q is ``[total_q, Hq, D]``,
            k, v ``[total_k, Hkv, D]`` and sequence ``b`` is batch row ``b`` of the mask.
        key_bias: optional float ``[B|1, Hq|Hkv|1, Lk]`` added to every query's score of key ``j`` (natural-log
            units, after ``scale``); not with ``varlen``.

    Returns:
        ``(o, lse)``: o ``[B, Hq, Lq, D]`` in q's dtype, lse ``[B, Hq, Lq]`` float32 (natural log);
        packed: o ``[total_q, Hq, D]``, lse ``[Hq, total_q]``.
    """
    if varlen is None:
        batch, n_q_heads, q_len, head_dim = q.shape
        n_kv_heads, kv_len = k.shape[1], k.shape[2]
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((batch, n_q_heads, q_len), dtype=torch.float32, device=q.device)
        qs, ks, vs, os_ = (x.stride()[:3] for x in (q, k, v, o))
        ls = lse.stride()[:2]
        cu = None
    else:
        cu_q, cu_k, q_len, kv_len = varlen
        batch = cu_q.shape[0] - 1
        n_q_heads, head_dim, n_kv_heads = q.shape[1], q.shape[2], k.shape[1]
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((n_q_heads, q.shape[0]), dtype=torch.float32, device=q.device)
        qs, ks, vs, os_ = ((0, x.stride(1), x.stride(0)) for x in (q, k, v, o))
        ls = (0, lse.stride(0))
        cu = (cu_q.to(torch.int32).contiguous(), cu_k.to(torch.int32).contiguous())
    n_q_blocks = counts.shape[-1]
    if o.numel() == 0 or batch == 0:
        return o, lse
    if key_bias is not None and varlen is not None:
        raise ValueError("key_bias is not supported with packed (varlen) sequences; got both.")
    mask_heads = counts.shape[1]
    mask_head_div = 1 if mask_heads == n_q_heads else (n_q_heads // n_kv_heads if mask_heads == n_kv_heads else n_q_heads)
    left, right = band(causal, preds.window)
    ranges = range_table(preds, batch, q_len, kv_len, q.device, cu)
    q_seg, kv_seg, q_segb, k_segb = segment_tables(preds, block_m, block_n)
    dummy = counts
    bias, bias_sb, bias_sh = bias_table(key_bias, batch, n_q_heads, kv_len, dummy)
    slots = preds.bit_slots
    if slots is not None:
        slots = slots.to(torch.int32).expand(indices.shape).contiguous()
    bl, br = band_bounds(left, right)
    head_dim_pad = pow2_at_least(head_dim, 16)
    check_fits("fwd", q, block_m, block_n, head_dim_pad)
    grid = (n_q_blocks * batch * n_q_heads,)
    args = (
        q, k, v, o, lse, counts, indices, dummy if slots is None else slots,
        dummy if preds.bit_words is None else preds.bit_words, dummy if ranges is None else ranges,
        dummy if cu is None else cu[0], dummy if cu is None else cu[1],
        dummy if q_seg is None else q_seg, dummy if kv_seg is None else kv_seg,
        dummy if q_segb is None else q_segb, dummy if k_segb is None else k_segb, bias,
        *qs, *ks, *vs, *os_, *ls,
        counts.stride(0) if counts.shape[0] > 1 else 0, counts.stride(1) if mask_heads > 1 else 0,
        indices.stride(0) if indices.shape[0] > 1 else 0, indices.stride(1) if mask_heads > 1 else 0,
        _bstride(q_seg), _bstride(kv_seg), _bstride(q_segb), _bstride(k_segb), bias_sb, bias_sh,
        n_q_heads, q_len, kv_len, n_q_blocks, indices.shape[-1], scale * LOG2E, bl, br,
    )
    meta = dict(
        GROUP=n_q_heads // n_kv_heads, MASK_HEAD_DIV=mask_head_div, HAS_BAND=left >= 0 or right >= 0,
        HAS_RANGE=ranges is not None, HAS_SEG=q_seg is not None, HAS_BITS=slots is not None, VARLEN=cu is not None,
        HAS_BIAS=key_bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        TILE_N=fwd_tile(block_m, block_n, head_dim_pad, q.dtype),
        WORDS=words_per_row(block_n), HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        DOT_PRECISION=dot_precision(q.dtype),
    )
    launch(_autotuned_kernel, _block_sparse_fwd_kernel, "fwd", grid, args, meta, q.dtype, block_m, block_n)
    return o, lse
